//! A simulated PLC: a real Modbus TCP server (tokio-modbus) on loopback
//! whose memory the test drives, with hooks to check what the agent does
//! when it writes, and switches for exceptions and outages.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response};

/// Called on every write: (memory after the write, table, address, value).
pub type WriteHook = Box<dyn Fn(&Memory, char, u16, u16) + Send + Sync>;

/// The PLC's memory and behaviour switches.
#[derive(Default)]
pub struct Memory {
    /// Holding registers.
    pub holding: HashMap<u16, u16>,
    /// Input registers.
    pub input: HashMap<u16, u16>,
    /// Coils.
    pub coils: HashMap<u16, bool>,
    /// Discrete inputs.
    pub discrete: HashMap<u16, bool>,
    /// Holding-register addresses answered with IllegalDataAddress.
    pub refuse_holding: Vec<std::ops::Range<u16>>,
    /// Number of reads served.
    pub reads: u64,
    /// TCP connections accepted.
    pub connections: u64,
    /// Answer every write with IllegalDataAddress (an ack the PLC does
    /// not take).
    pub refuse_writes: bool,
    /// Time the PLC takes to answer each request (a real PLC's or a
    /// pymodbus server's reaction: 1–10 ms); zero by default.
    pub reaction: std::time::Duration,
}

impl Memory {
    /// Writes a u32 as two registers, high word first.
    pub fn set_u32(&mut self, address: u16, value: u32) {
        self.holding.insert(address, (value >> 16) as u16);
        self.holding.insert(address + 1, value as u16);
    }

    /// Writes ASCII into `registers` registers, NUL padded.
    pub fn set_string(&mut self, address: u16, registers: u16, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.resize(registers as usize * 2, 0);
        for i in 0..registers as usize {
            self.holding.insert(
                address + i as u16,
                u16::from_be_bytes([bytes[2 * i], bytes[2 * i + 1]]),
            );
        }
    }
}

#[derive(Clone)]
struct PlcService {
    memory: Arc<Mutex<Memory>>,
    hook: Arc<Mutex<Option<WriteHook>>>,
}

impl Service for PlcService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut m = self.memory.lock().expect("plc memory");
        m.reads += 1;
        let words = |map: &HashMap<u16, u16>, a: u16, n: u16| {
            (a..a + n)
                .map(|i| *map.get(&i).unwrap_or(&0))
                .collect::<Vec<u16>>()
        };
        let bits = |map: &HashMap<u16, bool>, a: u16, n: u16| {
            (a..a + n)
                .map(|i| *map.get(&i).unwrap_or(&false))
                .collect::<Vec<bool>>()
        };
        let result = match req {
            Request::ReadHoldingRegisters(a, n) => {
                if m.refuse_holding
                    .iter()
                    .any(|r| r.start < a + n && a < r.end)
                {
                    Err(ExceptionCode::IllegalDataAddress)
                } else {
                    Ok(Response::ReadHoldingRegisters(words(&m.holding, a, n)))
                }
            }
            Request::ReadInputRegisters(a, n) => {
                Ok(Response::ReadInputRegisters(words(&m.input, a, n)))
            }
            Request::ReadCoils(a, n) => Ok(Response::ReadCoils(bits(&m.coils, a, n))),
            Request::ReadDiscreteInputs(a, n) => {
                Ok(Response::ReadDiscreteInputs(bits(&m.discrete, a, n)))
            }
            Request::WriteSingleCoil(..) | Request::WriteSingleRegister(..) if m.refuse_writes => {
                Err(ExceptionCode::IllegalDataAddress)
            }
            Request::WriteSingleCoil(a, v) => {
                m.coils.insert(a, v);
                if let Some(hook) = self.hook.lock().expect("hook").as_ref() {
                    hook(&m, 'c', a, u16::from(v));
                }
                Ok(Response::WriteSingleCoil(a, v))
            }
            Request::WriteSingleRegister(a, v) => {
                m.holding.insert(a, v);
                if let Some(hook) = self.hook.lock().expect("hook").as_ref() {
                    hook(&m, 'h', a, v);
                }
                Ok(Response::WriteSingleRegister(a, v))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        let reaction = m.reaction;
        Box::pin(async move {
            if !reaction.is_zero() {
                tokio::time::sleep(reaction).await;
            }
            result
        })
    }
}

/// A running simulated PLC.
pub struct Plc {
    /// Its memory (lock to read or change it).
    pub memory: Arc<Mutex<Memory>>,
    hook: Arc<Mutex<Option<WriteHook>>>,
    /// The loopback address it listens on.
    pub addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Plc {
    /// Starts on a free loopback port.
    pub async fn start() -> Plc {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut plc = Plc {
            memory: Arc::default(),
            hook: Arc::default(),
            addr,
            task: None,
        };
        plc.serve(listener);
        plc
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let service = PlcService {
            memory: self.memory.clone(),
            hook: self.hook.clone(),
        };
        self.task = Some(tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream, socket_addr| {
                let service = service.clone();
                service
                    .memory
                    .lock()
                    .map(|mut m| m.connections += 1)
                    .unwrap_or_default();
                async move {
                    accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(service.clone())))
                }
            };
            let _ = server.serve(&on_connected, |_| {}).await;
        }));
    }

    /// Checks every write the agent makes.
    pub fn on_write(&self, hook: WriteHook) {
        *self.hook.lock().expect("hook") = Some(hook);
    }

    /// Takes the PLC off the network (connections dropped, port closed).
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Back on the network on the same port, memory kept.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// Locks the memory.
    pub fn mem(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().expect("plc memory")
    }
}

impl Drop for Plc {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A PLC program filling a ring buffer of records (the layout the Modbus
/// source's `rings` read): record `k` (sequence `k + 1`, quantity 1) goes
/// into slot `k mod slots` (`slot_size` registers from `first_slot`: the
/// sequence, then the quantity), then the write index (free-running u16)
/// is advanced.
#[derive(Clone, Debug)]
pub struct RingProgram {
    /// Write index register (holding).
    pub write_index: u16,
    /// Read index register (holding), written by the agent.
    pub read_index: u16,
    /// First register of slot 0 (holding).
    pub first_slot: u16,
    /// Slots.
    pub slots: u16,
    /// Registers per slot.
    pub slot_size: u16,
    /// Records made per second.
    pub per_second: u32,
    /// Wait for free slots (a well-written PLC program); `false` laps.
    pub waits: bool,
    /// Records made; records not made (ring full, PLC waited).
    pub made: Arc<std::sync::atomic::AtomicU64>,
    /// Records the program could not put in the ring because it was full
    /// (a real PLC would stop the line or drop them).
    pub held_back: Arc<std::sync::atomic::AtomicU64>,
}

impl RingProgram {
    /// The program over `slots` slots of 2 registers at holding 1000.., the
    /// indexes at holding 998 (write) and 999 (read).
    pub fn new(slots: u16, per_second: u32, waits: bool) -> Self {
        Self {
            write_index: 998,
            read_index: 999,
            first_slot: 1000,
            slots,
            slot_size: 2,
            per_second,
            waits,
            made: Arc::default(),
            held_back: Arc::default(),
        }
    }

    /// Makes `n` records at once (respecting `waits`); returns how many
    /// went in.
    pub fn make(&self, plc: &Plc, n: u64) -> u64 {
        use std::sync::atomic::Ordering;
        let mut m = plc.mem();
        let mut put = 0;
        for _ in 0..n {
            let written = *m.holding.get(&self.write_index).unwrap_or(&0);
            let read = *m.holding.get(&self.read_index).unwrap_or(&0);
            if self.waits && written.wrapping_sub(read) >= self.slots {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let k = u64::from(written);
            let done = self.made.fetch_add(1, Ordering::Relaxed) + 1;
            let slot = (k % u64::from(self.slots)) as u16;
            let at = self.first_slot + slot * self.slot_size;
            m.holding.insert(at, done as u16);
            m.holding.insert(at + 1, 1);
            m.holding.insert(self.write_index, written.wrapping_add(1));
            put += 1;
        }
        put
    }

    /// Runs the program every millisecond until the task is aborted.
    pub fn start(self, plc: Arc<Plc>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut due = 0u64;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let should = (started.elapsed().as_secs_f64() * f64::from(self.per_second)) as u64;
                if should > due {
                    self.make(&plc, should - due);
                    due = should;
                }
            }
        })
    }
}
