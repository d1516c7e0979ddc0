//! `plant-edge probe modbus`: what a device returns, without any journal.
//! For OT engineers commissioning a register map.

use std::time::Duration;

use anyhow::{bail, Context};
use protocols::sources::modbus::map::{decode, Address, Format, Order, Read, Table};
use protocols::sources::modbus::{self, Endpoint, SerialSettings};

/// Parses `tcp://HOST[:PORT]` or `rtu:///dev/ttyUSB0?baud=19200&parity=E`.
fn endpoint(text: &str) -> anyhow::Result<Endpoint> {
    if let Some(rest) = text.strip_prefix("tcp://") {
        let hostport = if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            rest.to_owned()
        } else {
            format!("{rest}:502")
        };
        return Ok(Endpoint::Tcp(hostport));
    }
    if let Some(rest) = text.strip_prefix("rtu://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut serial = SerialSettings {
            path: path.to_owned(),
            baud: 19200,
            parity: "even".into(),
            data_bits: 8,
            stop_bits: 1,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("{pair:?} is not key=value"))?;
            match k {
                "baud" => serial.baud = v.parse().with_context(|| format!("baud {v:?}"))?,
                "parity" => {
                    serial.parity = match v {
                        "E" | "even" => "even",
                        "O" | "odd" => "odd",
                        "N" | "none" => "none",
                        _ => bail!("parity is E, O or N, found {v:?}"),
                    }
                    .into()
                }
                "data_bits" => {
                    serial.data_bits = v.parse().with_context(|| format!("data_bits {v:?}"))?
                }
                "stop_bits" => {
                    serial.stop_bits = v.parse().with_context(|| format!("stop_bits {v:?}"))?
                }
                _ => bail!("unknown serial setting {k:?} (baud, parity, data_bits, stop_bits)"),
            }
        }
        return Ok(Endpoint::Rtu(serial));
    }
    bail!("endpoint is tcp://HOST[:PORT] or rtu:///dev/ttyX?baud=19200&parity=E, found {text:?}")
}

/// Parses `holding:100..110` (end exclusive) or `coil:5`.
fn range(text: &str) -> anyhow::Result<Read> {
    let (start, end) = match text.split_once("..") {
        Some((s, e)) => (
            s.to_owned(),
            Some(
                e.parse::<u32>()
                    .with_context(|| format!("range end in {text:?}"))?,
            ),
        ),
        None => (text.to_owned(), None),
    };
    let address: Address = start.parse().map_err(anyhow::Error::msg)?;
    let count = match end {
        Some(end) if end > address.offset as u32 => end - address.offset as u32,
        Some(_) => bail!("range end must be above its start in {text:?}"),
        None => 1,
    };
    if count > address.table.max_per_request() as u32 {
        bail!("at most {} per request", address.table.max_per_request());
    }
    Ok(Read {
        table: address.table,
        start: address.offset,
        count: count as u16,
    })
}

/// Runs the probe; prints one line per value.
pub async fn modbus(
    target: &str,
    unit: u8,
    read: &str,
    decode_as: &str,
    low_word_first: bool,
    swap_bytes: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let endpoint = endpoint(target)?;
    let r = range(read)?;
    let mut ctx = modbus::connect(&endpoint, unit, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect: {e}"))?;
    let words = match modbus::read(&mut ctx, r, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        Ok(words) => words,
        Err(code) => bail!(
            "device answered with exception {code:?} (0x{:02x})",
            u8::from(code)
        ),
    };
    if matches!(r.table, Table::Coil | Table::Discrete) {
        for (i, w) in words.iter().enumerate() {
            println!(
                "{} = {}",
                Address {
                    table: r.table,
                    offset: r.start + i as u16,
                    bit: None
                },
                *w != 0
            );
        }
        return Ok(());
    }
    let order = Order {
        low_word_first,
        swap_bytes,
    };
    let format = match decode_as {
        "string" => Format::String(r.count),
        other => Format::parse(other, None).map_err(anyhow::Error::msg)?,
    };
    let width = format.width() as usize;
    let mut i = 0;
    while i + width <= words.len() {
        let address = Address {
            table: r.table,
            offset: r.start + i as u16,
            bit: None,
        };
        let raw: Vec<String> = words[i..i + width]
            .iter()
            .map(|w| format!("0x{w:04x}"))
            .collect();
        match decode(format, order, &words[i..i + width]) {
            Ok(value) => println!("{address} = {} ({})", value.text(), raw.join(" ")),
            Err(e) => println!("{address} = BAD: {e} ({})", raw.join(" ")),
        }
        i += width;
    }
    Ok(())
}
