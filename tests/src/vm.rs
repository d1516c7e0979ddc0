//! The gateway image (packaging/image/build.sh) booted as an amd64 VM under
//! qemu's software emulation (TCG: `/dev/kvm` here is a software hypervisor
//! that boots a stock kernel slower), driven over ssh like an OT engineer
//! would. The VM's disk is a copy of the image, so each test starts from a
//! freshly flashed gateway.
//!
//! A power cut is a SIGKILL of qemu: the guest loses every page it had not
//! synced (the disk is opened with `cache=unsafe`, so what the guest wrote
//! out is in the host's file and what it had not is gone, as on a gateway
//! whose power fails).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The amd64 gateway image the tests boot: `$PLANT_EDGE_GATEWAY_IMAGE`, or
/// the one `scripts/test.sh` builds. Panics with how to build it when
/// missing (a test that needs it must fail, not skip).
pub fn gateway_image() -> PathBuf {
    let image = std::env::var_os("PLANT_EDGE_GATEWAY_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/image/gateway-amd64.img"));
    assert!(
        image.is_file(),
        "no gateway image at {}: build it with `packaging/image/build.sh amd64 target/debian/plant-edge_<version>_amd64.deb {}` (scripts/test.sh does, after building the .deb)",
        image.display(),
        image.display()
    );
    image
}

/// A free TCP port on the host's loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A gateway VM and its disk.
pub struct Vm {
    dir: tempfile::TempDir,
    disk: PathBuf,
    qemu: Option<Child>,
    /// Host port forwarded to the guest's ssh.
    pub ssh_port: u16,
    /// Host ports forwarded to guest ports (host, guest).
    pub forwards: Vec<(u16, u16)>,
    boots: u32,
}

impl Vm {
    /// A freshly flashed gateway: the image copied to a disk of `disk_mib`,
    /// an ssh key of the test's own on its configuration partition.
    pub fn flash(image: &Path, disk_mib: u64, guest_ports: &[u16]) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("gateway.img");
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(image)
                .arg(&disk),
        );
        run_ok(
            Command::new("truncate")
                .arg("-s")
                .arg(format!("{disk_mib}M"))
                .arg(&disk),
        );
        let key = dir.path().join("key");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key),
        );
        let vm = Vm {
            ssh_port: free_port(),
            forwards: guest_ports.iter().map(|&p| (free_port(), p)).collect(),
            disk,
            qemu: None,
            boots: 0,
            dir,
        };
        let keys = vm.dir.path().join("authorized_keys");
        std::fs::copy(key.with_extension("pub"), &keys).expect("authorized_keys");
        vm.put_on_config_partition(&[&keys]);
        vm
    }

    /// Copies files or directories onto the image's PLANTEDGE partition, as
    /// an OT engineer does from a laptop (only while the VM is off).
    pub fn put_on_config_partition(&self, paths: &[&Path]) {
        assert!(self.qemu.is_none(), "the gateway must be off");
        let mut command = Command::new(workspace().join("packaging/image/config-partition.sh"));
        command.arg(&self.disk).arg("put").args(paths);
        run_ok(&mut command);
    }

    /// Where files for the guest can be staged on the host.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Host port forwarded to `guest_port`.
    pub fn host_port(&self, guest_port: u16) -> u16 {
        self.forwards
            .iter()
            .find(|(_, guest)| *guest == guest_port)
            .map(|(host, _)| *host)
            .expect("a forwarded guest port")
    }

    /// Powers the gateway on (UEFI firmware, the image's own boot loader)
    /// and waits until ssh answers.
    pub fn boot(&mut self) -> Duration {
        assert!(self.qemu.is_none(), "already running");
        let started = Instant::now();
        let vars = self.dir.path().join("OVMF_VARS.fd");
        if !vars.exists() {
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                .expect("OVMF_VARS_4M.fd (Debian's ovmf package)");
        }
        let mut forwards = format!(
            "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{}-:22",
            self.ssh_port
        );
        for (host, guest) in &self.forwards {
            forwards.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        self.boots += 1;
        let console = self.dir.path().join(format!("console-{}.log", self.boots));
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "qemu64",
                "-m",
                "1024",
                "-smp",
                "2",
            ])
            .args(["-display", "none", "-no-reboot"])
            .arg("-drive")
            .arg("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                self.disk.display()
            ))
            .args(["-nic", &forwards])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (Debian's qemu-system-x86)");
        self.qemu = Some(child);
        self.wait_for_ssh(Duration::from_secs(300));
        started.elapsed()
    }

    fn wait_for_ssh(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.qemu.as_mut() {
                if let Some(status) = child.try_wait().expect("poll qemu") {
                    panic!(
                        "qemu exited ({status}) before ssh answered; console:\n{}",
                        self.console_tail()
                    );
                }
            }
            let out = self.ssh_output("true", Duration::from_secs(10));
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ssh did not answer within {limit:?}; console:\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The end of the current boot's serial console.
    pub fn console_tail(&self) -> String {
        let path = self.dir.path().join(format!("console-{}.log", self.boots));
        let text = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn ssh_output(&self, script: &str, timeout: Duration) -> Output {
        Command::new("timeout")
            .arg(format!("{}s", timeout.as_secs().max(1)))
            .arg("ssh")
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
            ])
            .arg("-i")
            .arg(self.dir.path().join("key"))
            .arg("-p")
            .arg(self.ssh_port.to_string())
            .arg("root@127.0.0.1")
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("ssh (Debian's openssh-client)")
    }

    /// Runs a shell script on the gateway as root.
    pub fn ssh(&self, script: &str) -> Output {
        self.ssh_output(script, Duration::from_secs(120))
    }

    /// Runs a shell script on the gateway; panics with its output unless it
    /// succeeds. Returns its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.ssh(script);
        assert!(
            out.status.success(),
            "on the gateway: `{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `script` succeeds on the gateway.
    pub fn wait_until(&self, what: &str, limit: Duration, script: &str) {
        let deadline = Instant::now() + limit;
        while !self.ssh(script).status.success() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Cuts the power: the guest loses whatever it had not synced.
    pub fn power_cut(&mut self) {
        if let Some(mut child) = self.qemu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Reboots the gateway from inside and waits for ssh.
    pub fn reboot(&mut self) -> Duration {
        // -no-reboot: qemu exits when the guest reboots, and is started
        // again here, so each boot has its own console log.
        let _ = self.ssh("systemctl reboot");
        let deadline = Instant::now() + Duration::from_secs(120);
        if let Some(mut child) = self.qemu.take() {
            while child.try_wait().expect("poll qemu").is_none() {
                assert!(Instant::now() < deadline, "the gateway did not shut down");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        self.boot()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
    }
}

fn run_ok(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
