//! Configuration errors: what a [`ConfigError`] holds and how a TOML or
//! check error finds its dotted key and line in the file's text.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem: which file, which key, what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Dotted key path (`journal.max_bytes`), or `-` for the whole file.
    pub key: String,
    /// What the key should hold, or what went wrong.
    pub expected: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.file.display(), line)?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        write!(f, "key `{}`: {}", self.key, self.expected)
    }
}

impl std::error::Error for ConfigError {}

/// The line (1-based) that sets `key` (dotted, `name[n]` for the n-th of
/// an array of tables) in TOML `text`, or the nearest table or inline
/// table above it; `None` when nothing of the key is in the text (a
/// default).
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let wanted: Vec<&str> = key.split('.').collect();
    let mut table: Vec<String> = Vec::new();
    // Arrays of tables seen so far, by their path: how many entries.
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(usize, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        let path: Vec<String> = if let Some(header) = t.strip_prefix("[[") {
            let name = header.split("]]").next().unwrap_or("").trim();
            let mut parts = resolve_arrays(name, &arrays);
            let full = name.to_owned();
            let index = arrays.get(&full).copied().unwrap_or(0);
            arrays.insert(full, index + 1);
            if let Some(last) = parts.last_mut() {
                *last = format!("{last}[{index}]");
            }
            table = parts.clone();
            parts
        } else if let Some(header) = t.strip_prefix('[') {
            let name = header.split(']').next().unwrap_or("").trim();
            table = resolve_arrays(name, &arrays);
            table.clone()
        } else if let Some((name, _)) = t.split_once('=') {
            let mut path = table.clone();
            path.extend(
                name.trim()
                    .split('.')
                    .map(|p| p.trim().trim_matches('"').to_owned()),
            );
            path
        } else {
            continue;
        };
        // `records = [...]` (an inline array) holds `records[0]`.
        let matched = path
            .iter()
            .zip(&wanted)
            .take_while(|(have, want)| {
                want.strip_prefix(have.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('['))
            })
            .count();
        // Only a line on the key's own path counts (not a sibling that
        // shares its table), and the deepest one wins.
        if matched == path.len() && matched > 0 && best.is_none_or(|(depth, _)| matched > depth) {
            best = Some((matched, i + 1));
        }
    }
    best.map(|(_, line)| line)
}

/// `sources.mes1.records` inside the current entry of an array of tables
/// above it (`sources.mes1` is not one; `x.items` in `[[x.items]]` is).
fn resolve_arrays(name: &str, arrays: &BTreeMap<String, usize>) -> Vec<String> {
    let parts: Vec<&str> = name.split('.').map(str::trim).collect();
    let mut resolved = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let prefix = parts[..=i].join(".");
        match arrays.get(&prefix) {
            // Not the header's own last part: that one is indexed by the caller.
            Some(count) if i + 1 < parts.len() => {
                resolved.push(format!("{part}[{}]", count.saturating_sub(1)))
            }
            _ => resolved.push((*part).to_owned()),
        }
    }
    resolved
}

/// Turns a TOML/serde error into file, dotted key, line and message.
pub(super) fn toml_error(file: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim().to_owned();
    let Some(span) = error.span() else {
        return ConfigError {
            file: file.to_owned(),
            key: "-".into(),
            expected: message,
            line: None,
        };
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let mut table = String::new();
    for line in before.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
    }
    let current = text.lines().nth(line_no - 1).unwrap_or("").trim();
    if current.starts_with('[') {
        // Errors inside a tagged table (a sink's or source's kind) point at
        // its header: that header is the table the field belongs to.
        table = current
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned();
    }
    let mut key = if current.starts_with('[') {
        table.clone()
    } else {
        let name = current.split('=').next().unwrap_or("").trim();
        match (table.is_empty(), name.is_empty()) {
            (_, true) => table.clone(),
            (true, false) => name.to_owned(),
            (false, false) => format!("{table}.{name}"),
        }
    };
    // serde names the offending field itself for unknown and missing ones.
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        if !key.ends_with(field) {
            key = if table.is_empty() {
                field.to_owned()
            } else {
                format!("{table}.{field}")
            };
        }
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
    }
    if key.is_empty() {
        key = "-".into();
    }
    ConfigError {
        file: file.to_owned(),
        key,
        expected: message,
        line: Some(line_no),
    }
}

/// Errors for the keys of one table: `keyed(file, "sources.mes1")`
/// makes `err("endpoint", ...)` name `sources.mes1.endpoint` (an empty
/// table: the key as given). The line is found later, from the text.
pub(super) fn keyed<'a, K: fmt::Display>(
    file: &'a Path,
    table: &'a str,
) -> impl Fn(K, String) -> ConfigError + 'a {
    move |sub, expected| ConfigError {
        file: file.to_owned(),
        key: if table.is_empty() {
            sub.to_string()
        } else {
            format!("{table}.{sub}")
        },
        expected,
        line: None,
    }
}
