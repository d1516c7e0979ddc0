//! The register map: addresses, value formats, decoding, and grouping of
//! reads into as few requests as the map allows.

use std::collections::BTreeMap;
use std::fmt;

/// A Modbus table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Read/write bits (function 1, 5).
    Coil,
    /// Read-only bits (function 2).
    Discrete,
    /// Read-only registers (function 4).
    Input,
    /// Read/write registers (function 3, 6).
    Holding,
}

impl Table {
    /// Most items one request may read (Modbus spec).
    pub fn max_per_request(self) -> u16 {
        match self {
            Table::Coil | Table::Discrete => 2000,
            Table::Input | Table::Holding => 125,
        }
    }

    fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
}

/// An address: `holding:100`, `input:7`, `coil:10`, `discrete:3`, or a bit
/// of a register, `holding:200.3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// Table.
    pub table: Table,
    /// 0-based protocol address.
    pub offset: u16,
    /// Bit within a register (0 = least significant), for flags in registers.
    pub bit: Option<u8>,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = match self.table {
            Table::Coil => "coil",
            Table::Discrete => "discrete",
            Table::Input => "input",
            Table::Holding => "holding",
        };
        write!(f, "{table}:{}", self.offset)?;
        if let Some(bit) = self.bit {
            write!(f, ".{bit}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Address {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected = || {
            format!("an address like holding:100, input:7, coil:10, discrete:3 or holding:200.3, found {text:?}")
        };
        let (table, rest) = text.split_once(':').ok_or_else(expected)?;
        let table = match table {
            "coil" | "coils" => Table::Coil,
            "discrete" | "discrete_input" => Table::Discrete,
            "input" | "input_register" => Table::Input,
            "holding" | "holding_register" => Table::Holding,
            _ => return Err(expected()),
        };
        let (offset, bit) = match rest.split_once('.') {
            Some((o, b)) => (
                o,
                Some(
                    b.parse::<u8>()
                        .ok()
                        .filter(|b| *b < 16)
                        .ok_or_else(expected)?,
                ),
            ),
            None => (rest, None),
        };
        if bit.is_some() && table.is_bits() {
            return Err(expected());
        }
        let offset = offset.parse::<u16>().map_err(|_| expected())?;
        Ok(Address { table, offset, bit })
    }
}

/// How a value is laid out in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One register, unsigned.
    U16,
    /// One register, signed.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, signed.
    I32,
    /// Two registers, IEEE 754 single.
    F32,
    /// Four registers, unsigned (values above i64::MAX do not decode).
    U64,
    /// Four registers, signed.
    I64,
    /// Four registers, IEEE 754 double.
    F64,
    /// One register of packed BCD (0..=9999).
    Bcd,
    /// `n` registers of ASCII, two characters each, NUL/space padded.
    String(u16),
    /// A single bit (coil, discrete input or register bit).
    Bool,
}

impl Format {
    /// Registers (or bits) the value spans.
    pub fn width(self) -> u16 {
        match self {
            Format::U16 | Format::I16 | Format::Bcd | Format::Bool => 1,
            Format::U32 | Format::I32 | Format::F32 => 2,
            Format::U64 | Format::I64 | Format::F64 => 4,
            Format::String(n) => n,
        }
    }

    /// Parses `u16`, `i16`, `u32`, `i32`, `f32`, `u64`, `i64`, `f64`, `bcd`,
    /// `bool`, or `string` (with `length` registers).
    pub fn parse(text: &str, length: Option<u16>) -> Result<Self, String> {
        Ok(match text {
            "u16" => Format::U16,
            "i16" => Format::I16,
            "u32" => Format::U32,
            "i32" => Format::I32,
            "f32" => Format::F32,
            "u64" => Format::U64,
            "i64" => Format::I64,
            "f64" => Format::F64,
            "bcd" => Format::Bcd,
            "bool" => Format::Bool,
            "string" => match length {
                Some(n) if (1..=64).contains(&n) => Format::String(n),
                _ => return Err("string needs length = 1..64 registers".into()),
            },
            other => {
                return Err(format!(
                    "u16, i16, u32, i32, f32, u64, i64, f64, bcd, bool or string, found {other:?}"
                ))
            }
        })
    }
}

/// Word and byte order of multi-register values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Order {
    /// Low word first (Modicon "little endian word order").
    pub low_word_first: bool,
    /// Bytes swapped inside each register (the odd device).
    pub swap_bytes: bool,
}

/// A decoded value (the record value type every source shares).
pub use crate::source::FieldValue as Value;

/// The raw bit pattern of an integer counter, as unsigned.
pub fn counter_raw(value: &Value, format: Format) -> Option<u64> {
    match (value, format) {
        (Value::Int(v), Format::I16) => Some(*v as i16 as u16 as u64),
        (Value::Int(v), Format::I32) => Some(*v as i32 as u32 as u64),
        (Value::Int(v), Format::I64) => Some(*v as u64),
        (Value::Int(v), _) if *v >= 0 => Some(*v as u64),
        _ => None,
    }
}

/// Decodes `format` from the registers starting at `words[0]`.
pub fn decode(format: Format, order: Order, words: &[u16]) -> Result<Value, String> {
    let need = format.width() as usize;
    if words.len() < need {
        return Err(format!("needs {need} registers, got {}", words.len()));
    }
    let word = |i: usize| {
        if order.swap_bytes {
            words[i].swap_bytes()
        } else {
            words[i]
        }
    };
    let pair = || {
        let (hi, lo) = if order.low_word_first {
            (word(1), word(0))
        } else {
            (word(0), word(1))
        };
        ((hi as u32) << 16) | lo as u32
    };
    // Four registers, most significant first unless low_word_first (then
    // the whole order is reversed, as Modicon devices store them).
    let quad = || {
        (0..4).fold(0u64, |acc, i| {
            let w = if order.low_word_first {
                word(3 - i)
            } else {
                word(i)
            };
            (acc << 16) | w as u64
        })
    };
    Ok(match format {
        Format::U16 => Value::Int(word(0) as i64),
        Format::I16 => Value::Int(word(0) as i16 as i64),
        Format::U32 => Value::Int(pair() as i64),
        Format::I32 => Value::Int(pair() as i32 as i64),
        Format::F32 => {
            let v = f32::from_bits(pair());
            if !v.is_finite() {
                return Err(format!("not a finite number ({v})"));
            }
            Value::Float(v as f64)
        }
        Format::U64 => {
            Value::Int(i64::try_from(quad()).map_err(|_| format!("{} is out of range", quad()))?)
        }
        Format::I64 => Value::Int(quad() as i64),
        Format::F64 => {
            let v = f64::from_bits(quad());
            if !v.is_finite() {
                return Err(format!("not a finite number ({v})"));
            }
            Value::Float(v)
        }
        Format::Bcd => {
            let w = word(0);
            let mut value = 0i64;
            for shift in [12, 8, 4, 0] {
                let digit = (w >> shift) & 0xF;
                if digit > 9 {
                    return Err(format!("0x{w:04x} is not BCD"));
                }
                value = value * 10 + digit as i64;
            }
            Value::Int(value)
        }
        Format::String(n) => {
            let mut bytes = Vec::with_capacity(n as usize * 2);
            for i in 0..n as usize {
                bytes.extend_from_slice(&word(i).to_be_bytes());
            }
            let text: String = String::from_utf8_lossy(&bytes)
                .trim_end_matches(['\0', ' '])
                .to_owned();
            if text.chars().any(|c| c.is_control()) {
                return Err("string holds control characters".into());
            }
            Value::Text(text)
        }
        Format::Bool => Value::Bool(word(0) != 0),
    })
}

/// One read request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// Table.
    pub table: Table,
    /// First address.
    pub start: u16,
    /// Count.
    pub count: u16,
}

/// Groups the spans `(address, width)` into as few reads as possible:
/// contiguous or nearly (gap up to `max_gap`) spans of one table merge,
/// within the per-request limit.
pub fn plan(spans: &[(Address, u16)], max_gap: u16) -> Vec<Read> {
    let mut by_table: BTreeMap<Table, Vec<(u16, u16)>> = BTreeMap::new();
    for (address, width) in spans {
        by_table
            .entry(address.table)
            .or_default()
            .push((address.offset, address.offset + width));
    }
    let mut reads = Vec::new();
    for (table, mut ranges) in by_table {
        ranges.sort_unstable();
        let mut current: Option<(u16, u16)> = None;
        for (start, end) in ranges {
            current = match current {
                Some((cs, ce))
                    if start <= ce.saturating_add(max_gap)
                        && end.max(ce) - cs <= table.max_per_request() =>
                {
                    Some((cs, end.max(ce)))
                }
                Some((cs, ce)) => {
                    reads.push(Read {
                        table,
                        start: cs,
                        count: ce - cs,
                    });
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((cs, ce)) = current {
            reads.push(Read {
                table,
                start: cs,
                count: ce - cs,
            });
        }
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        s.parse().expect("address")
    }

    #[test]
    fn addresses_parse_with_tables_and_register_bits() {
        assert_eq!(
            addr("holding:200.3"),
            Address {
                table: Table::Holding,
                offset: 200,
                bit: Some(3)
            }
        );
        assert_eq!(addr("coil:10").table, Table::Coil);
        assert!("coil:10.1".parse::<Address>().is_err());
        assert!("holding:70000".parse::<Address>().is_err());
        assert!("register:1".parse::<Address>().is_err());
    }

    /// The four registers of `v` in each word and byte order.
    fn layouts(v: u64) -> Vec<(Order, [u16; 4])> {
        let big = [
            (v >> 48) as u16,
            (v >> 32) as u16,
            (v >> 16) as u16,
            v as u16,
        ];
        let low_first = [big[3], big[2], big[1], big[0]];
        let swap = |w: [u16; 4]| w.map(u16::swap_bytes);
        let order = |low_word_first, swap_bytes| Order {
            low_word_first,
            swap_bytes,
        };
        vec![
            (order(false, false), big),
            (order(true, false), low_first),
            (order(false, true), swap(big)),
            (order(true, true), swap(low_first)),
        ]
    }

    #[test]
    fn sixty_four_bit_values_decode_in_every_word_and_byte_order() {
        let millis: u64 = 1_764_600_000_123; // epoch milliseconds
        let negative = -123_456_789_012_i64;
        let weight = 1234.5678_f64;
        for (order, words) in layouts(millis) {
            assert_eq!(
                decode(Format::U64, order, &words),
                Ok(Value::Int(millis as i64)),
                "{order:?}"
            );
        }
        for (order, words) in layouts(negative as u64) {
            assert_eq!(
                decode(Format::I64, order, &words),
                Ok(Value::Int(negative)),
                "{order:?}"
            );
            assert_eq!(
                counter_raw(&Value::Int(negative), Format::I64),
                Some(negative as u64)
            );
        }
        for (order, words) in layouts(weight.to_bits()) {
            assert_eq!(
                decode(Format::F64, order, &words),
                Ok(Value::Float(weight)),
                "{order:?}"
            );
        }
        assert!(
            decode(Format::U64, Order::default(), &[0xFFFF; 4]).is_err(),
            "above i64::MAX"
        );
        assert!(
            decode(Format::F64, Order::default(), &[0x7FF0, 0, 0, 0]).is_err(),
            "infinity"
        );
        assert_eq!(Format::parse("u64", None), Ok(Format::U64));
        assert_eq!(Format::U64.width(), 4);
    }

    #[test]
    fn word_and_byte_orders_decode_the_same_number() {
        let n: u32 = 0x0001_86A0; // 100000
        let big = [0x0001, 0x86A0];
        let low_first = [0x86A0, 0x0001];
        let swapped = [0x0100, 0xA086];
        assert_eq!(
            decode(Format::U32, Order::default(), &big),
            Ok(Value::Int(n as i64))
        );
        assert_eq!(
            decode(
                Format::U32,
                Order {
                    low_word_first: true,
                    swap_bytes: false
                },
                &low_first
            ),
            Ok(Value::Int(n as i64))
        );
        assert_eq!(
            decode(
                Format::U32,
                Order {
                    low_word_first: false,
                    swap_bytes: true
                },
                &swapped
            ),
            Ok(Value::Int(n as i64))
        );
        assert_eq!(
            decode(Format::I16, Order::default(), &[0xFFFF]),
            Ok(Value::Int(-1))
        );
        assert_eq!(counter_raw(&Value::Int(-1), Format::I16), Some(0xFFFF));
    }

    #[test]
    fn floats_strings_and_bcd_decode_and_bad_values_are_errors() {
        let f = 12.5f32.to_bits();
        assert_eq!(
            decode(Format::F32, Order::default(), &[(f >> 16) as u16, f as u16]),
            Ok(Value::Float(12.5))
        );
        assert_eq!(
            decode(
                Format::String(3),
                Order::default(),
                &[0x574F, 0x2D37, 0x0000]
            ),
            Ok(Value::Text("WO-7".into()))
        );
        assert_eq!(
            decode(Format::Bcd, Order::default(), &[0x1234]),
            Ok(Value::Int(1234))
        );
        assert!(decode(Format::Bcd, Order::default(), &[0x12A4]).is_err());
        let nan = f32::NAN.to_bits();
        assert!(decode(
            Format::F32,
            Order::default(),
            &[(nan >> 16) as u16, nan as u16]
        )
        .is_err());
    }

    #[test]
    fn reads_merge_across_small_gaps_and_respect_the_125_register_limit() {
        let spans = [
            (addr("holding:100"), 2),
            (addr("holding:103"), 1),
            (addr("holding:120"), 2),
            (addr("input:0"), 1),
            (addr("coil:5"), 1),
        ];
        let reads = plan(&spans, 4);
        assert!(reads.contains(&Read {
            table: Table::Holding,
            start: 100,
            count: 4
        }));
        assert!(reads.contains(&Read {
            table: Table::Holding,
            start: 120,
            count: 2
        }));
        assert_eq!(reads.len(), 4);
        let wide = [(addr("holding:0"), 100), (addr("holding:100"), 50)];
        let reads = plan(&wide, 0);
        assert_eq!(reads.len(), 2, "{reads:?}");
        assert!(reads.iter().all(|r| r.count <= 125));
    }
}
