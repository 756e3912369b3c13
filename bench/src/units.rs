//! Human sizes on the command line (`1MiB`, `10MB`, `4k`) and back.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Error};

/// A byte count parsed from a human size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

/// Parses `123`, `4KiB`, `1.5 MiB`, `1GB`, `8m`. `KiB`/`K` and friends are
/// powers of 1024 (what people mean for image layers); `KB`/`MB`/`GB` are
/// powers of 1000, as the SI says.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .with_context(|| format!("'{s}' does not start with a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => bail!("unknown size unit '{other}' in '{s}'"),
    };
    if !num.is_finite() || num < 0.0 {
        bail!("size '{s}' must be a non-negative number");
    }
    Ok((num * mult as f64).round() as u64)
}

/// Shortest exact binary-unit spelling, e.g. `1GiB`, `4KiB`, `1536KiB`, `17`.
pub fn format_size(n: u64) -> String {
    for (unit, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if n >= m && n % m == 0 {
            return format!("{}{unit}", n / m);
        }
    }
    format!("{n}B")
}

impl FromStr for Size {
    type Err = Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        parse_size(s).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_sizes() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("8 M").unwrap(), 8 << 20);
        assert_eq!(parse_size("1.5MiB").unwrap(), 3 << 19);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("7B").unwrap(), 7);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn formats_back() {
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(100 << 20), "100MiB");
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(1536 << 10), "1536KiB");
        assert_eq!(format_size(17), "17B");
        assert_eq!(Size(1 << 20).to_string(), "1MiB");
    }
}
