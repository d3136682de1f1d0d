//! The one parser and printer for rates, sizes and durations.
//!
//! Every place a user writes a quantity — command-line flags, `shaper.ron`, rate files and the Lua
//! policy — goes through this module, so `2mbit` means the same thing everywhere. Unit confusion is
//! a documented source of "my limit does nothing" reports (tc reads `mbps` as *megabytes*), so the
//! ambiguous spellings are refused with a message that names both meanings instead of guessing.
//!
//! * [`Rate`]: bits per second. A bare number or `bit` is bit/s; `k`/`m`/`g`/`t`, `kbit`/`mbit`/…
//!   (optionally followed by `/s`) multiply by 1000; `kibit`/`mibit`/`gibit` by 1024. Byte rates are
//!   written with a capital `B`: `B/s`, `KB/s`, `MB/s`, `GB/s`, `KiB/s`, `MiB/s`, `GiB/s`.
//! * [`Size`]: bytes. `B`, `KB`, `MB`, `GB`, `TB` (×1000) and `KiB`, `MiB`, `GiB`, `TiB` (×1024).
//! * [`Interval`]: `ms`, `s`, `m`, `h`. A bare number is refused: `5` was read as 5 ms in
//!   `shaper.ron` and as 5 s on the command line, so a duration always names its unit.
//!
//! Rates are bounded: at least [`Rate::MIN`] (8kbit, the planner's floor, to which `0` used to be
//! raised silently) and at most [`Rate::MAX`] (1tbit; far above it HTB's burst, stored as 64 ns
//! ticks, rounds to zero). "No limit" is written `unlimited`.
//!
//! Numbers may have a fractional part (`1.5mbit`) when the result is a whole number of the base
//! unit (bit/s, bytes, milliseconds): `0.5bit` and `0.5` are refused alike rather than rounded.
//! Bare numbers in `shaper.ron` and in Lua follow exactly the same rules as strings.
//! Printing ([`std::fmt::Display`]) chooses the largest unit that represents the value exactly, so
//! `parse(print(x)) == x` for every value.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a quantity could not be parsed. Every message quotes the input and says what would work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty {kind}: write a number with a unit, e.g. {example}")]
    Empty {
        kind: &'static str,
        example: &'static str,
    },
    #[error("{kind} {input:?} is negative: write a value such as {example}")]
    Negative {
        kind: &'static str,
        input: String,
        example: &'static str,
    },
    #[error("{kind} {input:?} does not start with a number (e.g. {example})")]
    NoNumber {
        kind: &'static str,
        input: String,
        example: &'static str,
    },
    #[error("unknown {kind} unit {unit:?} in {input:?}: use one of {known}")]
    UnknownUnit {
        kind: &'static str,
        input: String,
        unit: String,
        known: &'static str,
    },
    #[error(
        "{input:?} is ambiguous: {unit:?} means {bytes} per second to tc but is often meant as \
         {bits} per second; write \"{number}{bits_unit}\" for {bits}/s or \"{number}{bytes_unit}\" \
         for {bytes}/s",
        bits = meaning.1, bits_unit = meaning.2, bytes = meaning.3, bytes_unit = meaning.4
    )]
    Ambiguous {
        input: String,
        unit: String,
        number: String,
        meaning: &'static Ambiguity,
    },
    #[error("{kind} {input:?} is too large: the largest is {max}")]
    Overflow {
        kind: &'static str,
        input: String,
        max: String,
    },
    #[error("{kind} {input:?} is below the smallest, {min}: {advice}")]
    TooSmall {
        kind: &'static str,
        input: String,
        min: String,
        advice: &'static str,
    },
    #[error(
        "{kind} {input:?} is not a whole number of {base}: write a value that comes out whole, \
         e.g. {example}"
    )]
    NotWhole {
        kind: &'static str,
        input: String,
        base: &'static str,
        example: &'static str,
    },
    #[error("{kind} {input:?} has no unit: write it with one, e.g. {example}")]
    NoUnit {
        kind: &'static str,
        input: String,
        example: &'static str,
    },
}

/// A rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rate(u64);

/// An amount of data in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(u64);

/// A time span written by a user (cycle interval, flush interval). Millisecond resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Interval(Duration);

/// One unit a quantity can be written in: its spelling(s) and how many base units it stands for.
struct Unit {
    names: &'static [&'static str],
    /// Case matters for byte-rate units, where `B` (bytes) and `b` (bits) must not be confused.
    case_sensitive: bool,
    factor: u64,
}

const fn unit(names: &'static [&'static str], factor: u64) -> Unit {
    Unit {
        names,
        case_sensitive: false,
        factor,
    }
}

const fn exact(names: &'static [&'static str], factor: u64) -> Unit {
    Unit {
        names,
        case_sensitive: true,
        factor,
    }
}

const K: u64 = 1000;
const KI: u64 = 1024;

/// Rate units; the first name of each is what [`Rate`]'s `Display` prints, largest factor first
/// among the printable ones.
const RATE_UNITS: &[Unit] = &[
    unit(&["tbit", "t", "tbit/s"], K * K * K * K),
    unit(&["gbit", "g", "gbit/s"], K * K * K),
    unit(&["mbit", "m", "mbit/s"], K * K),
    unit(&["kbit", "k", "kbit/s"], K),
    unit(&["bit", "", "bit/s"], 1),
    unit(&["gibit", "gibit/s"], KI * KI * KI),
    unit(&["mibit", "mibit/s"], KI * KI),
    unit(&["kibit", "kibit/s"], KI),
    exact(&["GB/s", "gB/s"], 8 * K * K * K),
    exact(&["MB/s", "mB/s"], 8 * K * K),
    exact(&["KB/s", "kB/s"], 8 * K),
    exact(&["B/s"], 8),
    exact(&["GiB/s"], 8 * KI * KI * KI),
    exact(&["MiB/s"], 8 * KI * KI),
    exact(&["KiB/s"], 8 * KI),
];
const RATE_KNOWN: &str = "bit, kbit, mbit, gbit (or k, m, g), kibit, mibit, gibit for bits per second; \
                          B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s for bytes per second";

const SIZE_UNITS: &[Unit] = &[
    unit(&["TiB"], KI * KI * KI * KI),
    unit(&["GiB"], KI * KI * KI),
    unit(&["MiB"], KI * KI),
    unit(&["KiB"], KI),
    unit(&["TB"], K * K * K * K),
    unit(&["GB"], K * K * K),
    unit(&["MB"], K * K),
    unit(&["KB"], K),
    unit(&["B", ""], 1),
];
const SIZE_KNOWN: &str = "B, KB, MB, GB, TB (×1000), KiB, MiB, GiB, TiB (×1024)";

const INTERVAL_UNITS: &[Unit] = &[
    unit(&["h"], 3_600_000),
    unit(&["m", "min"], 60_000),
    unit(&["s", "sec"], 1000),
    unit(&["ms"], 1),
];
const INTERVAL_KNOWN: &str = "ms, s, m, h";

/// What distinguishes one kind of quantity when parsing and printing.
struct Kind {
    name: &'static str,
    example: &'static str,
    units: &'static [Unit],
    known: &'static str,
    /// Spellings refused because they read two ways (see [`AMBIGUOUS_RATES`]).
    ambiguous: &'static [Ambiguity],
    /// The base unit, named in "not a whole number of …".
    base: &'static str,
    /// The accepted range, in base units.
    min: u64,
    max: u64,
    /// What to write instead of a value below `min`.
    below_min: &'static str,
}

/// `(lower-case spelling, bits name, bits unit, bytes name, bytes unit)`.
type Ambiguity = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const RATE: Kind = Kind {
    name: "rate",
    example: "\"2mbit\" or \"500KB/s\"",
    units: RATE_UNITS,
    known: RATE_KNOWN,
    ambiguous: AMBIGUOUS_RATES,
    base: "bits per second",
    min: Rate::MIN.0,
    max: Rate::MAX.0,
    below_min: "slower rates cannot be shaped usefully; for no limit write \"unlimited\" or \
                leave the limit unset",
};
const SIZE: Kind = Kind {
    name: "size",
    example: "\"20GB\" or \"512MiB\"",
    units: SIZE_UNITS,
    known: SIZE_KNOWN,
    ambiguous: &[],
    base: "bytes",
    min: 0,
    max: u64::MAX,
    below_min: "",
};
const INTERVAL: Kind = Kind {
    name: "interval",
    example: "\"1s\" or \"500ms\"",
    units: INTERVAL_UNITS,
    known: INTERVAL_KNOWN,
    ambiguous: &[],
    base: "milliseconds",
    min: 0,
    max: u64::MAX,
    below_min: "",
};

/// Spellings tc accepts whose meaning (bytes) differs from what most people write them for (bits).
const AMBIGUOUS_RATES: &[Ambiguity] = &[
    ("bps", "bits", "bit", "bytes", "B/s"),
    ("kbps", "kilobits", "kbit", "kilobytes", "KB/s"),
    ("mbps", "megabits", "mbit", "megabytes", "MB/s"),
    ("gbps", "gigabits", "gbit", "gigabytes", "GB/s"),
    ("tbps", "terabits", "tbit", "terabytes", "TB/s"),
    ("kb/s", "kilobits", "kbit", "kilobytes", "KB/s"),
    ("b/s", "bits", "bit", "bytes", "B/s"),
    ("kb", "kilobits", "kbit", "kilobytes", "KB/s"),
    ("mb", "megabits", "mbit", "megabytes", "MB/s"),
    ("gb", "gigabits", "gbit", "gigabytes", "GB/s"),
];

fn parse_quantity(kind: &Kind, input: &str) -> Result<u64, UnitError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(UnitError::Empty {
            kind: kind.name,
            example: kind.example,
        });
    }
    if text.starts_with('-') {
        return Err(UnitError::Negative {
            kind: kind.name,
            input: input.to_string(),
            example: kind.example,
        });
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, unit_text) = text.split_at(split);
    let unit_text = unit_text.trim();
    let number: String = number.chars().filter(|&c| c != '_').collect();
    let no_number = || UnitError::NoNumber {
        kind: kind.name,
        input: input.to_string(),
        example: kind.example,
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number.as_str(), ""),
    };
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(no_number());
    }
    let factor = match lookup_unit(kind, unit_text) {
        Some(f) => f,
        None if unit_text.is_empty() => {
            return Err(UnitError::NoUnit {
                kind: kind.name,
                input: input.to_string(),
                example: kind.example,
            });
        }
        None => {
            let lower = unit_text.to_ascii_lowercase();
            if let Some(meaning) = kind.ambiguous.iter().find(|a| a.0 == lower) {
                return Err(UnitError::Ambiguous {
                    input: input.to_string(),
                    unit: unit_text.to_string(),
                    number,
                    meaning,
                });
            }
            return Err(UnitError::UnknownUnit {
                kind: kind.name,
                input: input.to_string(),
                unit: unit_text.to_string(),
                known: kind.known,
            });
        }
    };
    let overflow = || UnitError::Overflow {
        kind: kind.name,
        input: input.to_string(),
        max: format_quantity(kind, kind.max),
    };
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| overflow())?
    };
    let mut value = whole.checked_mul(factor as u128).ok_or_else(overflow)?;
    let frac = frac.trim_end_matches('0');
    if !frac.is_empty() {
        let not_whole = || UnitError::NotWhole {
            kind: kind.name,
            input: input.to_string(),
            base: kind.base,
            example: kind.example,
        };
        // Exact decimal arithmetic. Every factor is below 10^13, so 24 significant fractional
        // digits keep the product within u128; a value needing more is not whole in practice.
        if frac.len() > 24 {
            return Err(not_whole());
        }
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = frac.parse::<u128>().map_err(|_| no_number())? * factor as u128;
        if !scaled.is_multiple_of(scale) {
            return Err(not_whole());
        }
        value += scaled / scale;
    }
    let value = u64::try_from(value).map_err(|_| overflow())?;
    check_range(kind, value, input)
}

/// `value` if it lies within `kind`'s range, else the error naming `input` and the bound.
fn check_range(kind: &Kind, value: u64, input: &str) -> Result<u64, UnitError> {
    if value > kind.max {
        return Err(UnitError::Overflow {
            kind: kind.name,
            input: input.to_string(),
            max: format_quantity(kind, kind.max),
        });
    }
    if value < kind.min {
        return Err(UnitError::TooSmall {
            kind: kind.name,
            input: input.to_string(),
            min: format_quantity(kind, kind.min),
            advice: kind.below_min,
        });
    }
    Ok(value)
}

fn lookup_unit(kind: &Kind, text: &str) -> Option<u64> {
    kind.units.iter().find_map(|u| {
        let hit = u.names.iter().any(|n| {
            if u.case_sensitive {
                *n == text
            } else {
                n.eq_ignore_ascii_case(text)
            }
        });
        hit.then_some(u.factor)
    })
}

/// The exact spelling: the first unit (in table order) that divides the value, with its first name.
fn format_quantity(kind: &Kind, value: u64) -> String {
    if value == 0 {
        return format!(
            "0{}",
            kind.units.iter().find(|u| u.factor == 1).unwrap().names[0]
        );
    }
    let unit = kind
        .units
        .iter()
        .find(|u| value.is_multiple_of(u.factor))
        .expect("every kind has a unit of factor 1");
    format!("{}{}", value / unit.factor, unit.names[0])
}

impl Rate {
    pub const ZERO: Rate = Rate(0);
    /// The smallest rate a user may ask for (8kbit = 1000 bytes/s, under one full-size packet
    /// a second): the planner has always raised smaller rates to it, so `0` or `500bit` became
    /// 8kbit/s silently; now they are refused instead.
    pub const MIN: Rate = Rate(8_000);
    /// The largest rate a user may ask for (1tbit). HTB carries 64-bit rates, but its burst is a
    /// transmission time in 64 ns ticks: above about 30 Tbit/s a 256 KiB burst is zero ticks, and
    /// `burst 0b` lets a class send nothing in one go. 1tbit leaves a wide margin.
    pub const MAX: Rate = Rate(1_000_000_000_000);

    pub const fn from_bits_per_sec(bits: u64) -> Self {
        Rate(bits)
    }
    pub const fn bits_per_sec(self) -> u64 {
        self.0
    }
    /// Bytes per second, rounded down: what tc's rate structures carry.
    pub const fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
    /// A short approximate form for tables (`1.53mbit`); [`Display`](fmt::Display) is exact.
    pub fn human(self) -> String {
        human(self.0, 1000, &["bit", "kbit", "mbit", "gbit", "tbit"])
    }
}

impl Size {
    pub const fn from_bytes(bytes: u64) -> Self {
        Size(bytes)
    }
    pub const fn bytes(self) -> u64 {
        self.0
    }
    /// A short approximate form for tables (`1.2GB`); [`Display`](fmt::Display) is exact.
    pub fn human(self) -> String {
        human(self.0, 1000, &["B", "KB", "MB", "GB", "TB", "PB"])
    }
}

impl Interval {
    pub const fn from_millis(ms: u64) -> Self {
        Interval(Duration::from_millis(ms))
    }
    pub const fn duration(self) -> Duration {
        self.0
    }
}

fn human(value: u64, base: u64, names: &[&str]) -> String {
    let mut unit = 0;
    let mut scaled = value as f64;
    while scaled >= base as f64 && unit + 1 < names.len() {
        scaled /= base as f64;
        unit += 1;
    }
    if unit == 0 {
        format!("{value}{}", names[0])
    } else {
        let text = format!("{scaled:.2}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{text}{}", names[unit])
    }
}

macro_rules! quantity_traits {
    ($ty:ident, $kind:ident, $get:expr, $make:expr) => {
        impl FromStr for $ty {
            type Err = UnitError;
            fn from_str(s: &str) -> Result<Self, UnitError> {
                parse_quantity(&$kind, s).map($make)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&format_quantity(&$kind, $get(self)))
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            /// Accepts a string with a unit, or a bare non-negative integer in the base unit.
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(QuantityVisitor::<$ty>(std::marker::PhantomData))
            }
        }
        impl From<u64> for $ty {
            fn from(v: u64) -> Self {
                $make(v)
            }
        }
        impl QuantityName for $ty {
            const NAME: &'static str = $kind.name;
        }
    };
}

trait QuantityName: FromStr<Err = UnitError> {
    const NAME: &'static str;
}

struct QuantityVisitor<T>(std::marker::PhantomData<T>);

impl<T: QuantityName> serde::de::Visitor<'_> for QuantityVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} such as \"2mbit\", \"20GB\" or \"1s\"", T::NAME)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    // Bare numbers go through the same parser as strings, so `interval: 5` is refused like
    // `--interval 5` and `uplink: 0` like `--uplink 0`.
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        v.to_string().parse().map_err(E::custom)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        v.to_string().parse().map_err(E::custom)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
        v.to_string().parse().map_err(E::custom)
    }
}

quantity_traits!(Rate, RATE, |r: &Rate| r.0, Rate);
quantity_traits!(Size, SIZE, |s: &Size| s.0, Size);
quantity_traits!(
    Interval,
    INTERVAL,
    |i: &Interval| i.0.as_millis() as u64,
    Interval::from_millis
);

/// A pair of limits written `UP[:DOWN]`, as nbdkit's `rate=` takes one and shaper needs two:
/// `2mbit` limits both directions, `1mbit:8mbit` upload and download separately, and either side may
/// be `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RatePair {
    pub up: Option<Rate>,
    pub down: Option<Rate>,
}

impl FromStr for RatePair {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let side = |t: &str| -> Result<Option<Rate>, UnitError> {
            if t.trim().eq_ignore_ascii_case("unlimited") {
                Ok(None)
            } else {
                t.parse().map(Some)
            }
        };
        match s.split_once(':') {
            Some((up, down)) => Ok(RatePair {
                up: side(up)?,
                down: side(down)?,
            }),
            None => {
                let both = side(s)?;
                Ok(RatePair {
                    up: both,
                    down: both,
                })
            }
        }
    }
}

impl fmt::Display for RatePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |r: Option<Rate>| r.map_or_else(|| "unlimited".to_string(), |r| r.to_string());
        if self.up == self.down {
            f.write_str(&side(self.up))
        } else {
            write!(f, "{}:{}", side(self.up), side(self.down))
        }
    }
}

impl Serialize for RatePair {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RatePair {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate(s: &str) -> u64 {
        s.parse::<Rate>().unwrap().bits_per_sec()
    }
    fn size(s: &str) -> u64 {
        s.parse::<Size>().unwrap().bytes()
    }
    fn rate_err(s: &str) -> String {
        s.parse::<Rate>().unwrap_err().to_string()
    }

    #[test]
    fn rates_in_bits() {
        assert_eq!(rate("10000"), 10_000);
        assert_eq!(rate("10000bit"), 10_000);
        assert_eq!(rate("20k"), 20_000);
        assert_eq!(rate("20kbit"), 20_000);
        assert_eq!(rate("20KBIT"), 20_000);
        assert_eq!(rate("2Mbit"), 2_000_000);
        assert_eq!(rate("2m"), 2_000_000);
        assert_eq!(rate("1.5mbit"), 1_500_000);
        assert_eq!(rate("3g"), 3_000_000_000);
        assert_eq!(rate("3Gbit/s"), 3_000_000_000);
        assert_eq!(rate("8kibit"), 8192);
        assert_eq!(rate(" 256 kbit "), 256_000);
        assert_eq!(rate("1_000k"), 1_000_000);
    }

    #[test]
    fn rates_in_bytes() {
        assert_eq!(rate("1000B/s"), 8000);
        assert_eq!(rate("500KB/s"), 4_000_000);
        assert_eq!(rate("500kB/s"), 4_000_000);
        assert_eq!(rate("2MB/s"), 16_000_000);
        assert_eq!(rate("1GB/s"), 8_000_000_000);
        assert_eq!(rate("1KiB/s"), 8192);
        assert_eq!(rate("1MiB/s"), 8 * 1024 * 1024);
    }

    #[test]
    fn tc_ambiguous_units_name_both_meanings() {
        for input in [
            "30mbps", "30Mbps", "30kbps", "30bps", "30gbps", "30kb/s", "30mb",
        ] {
            let msg = rate_err(input);
            assert!(msg.contains("ambiguous"), "{input}: {msg}");
            assert!(msg.contains(input), "{input}: {msg}");
        }
        let msg = rate_err("30mbps");
        assert!(msg.contains("\"30mbit\""), "{msg}");
        assert!(msg.contains("\"30MB/s\""), "{msg}");
        assert!(
            msg.contains("megabits") && msg.contains("megabytes"),
            "{msg}"
        );
    }

    #[test]
    fn rate_errors_name_the_value() {
        let msg = rate_err("");
        assert!(msg.contains("empty rate"), "{msg}");
        let msg = rate_err("-5mbit");
        assert!(
            msg.contains("\"-5mbit\"") && msg.contains("negative"),
            "{msg}"
        );
        let msg = rate_err("fast");
        assert!(msg.contains("\"fast\"") && msg.contains("number"), "{msg}");
        let msg = rate_err("5 furlongs");
        assert!(
            msg.contains("\"furlongs\"") && msg.contains("kbit"),
            "{msg}"
        );
        let msg = rate_err("99999999999tbit");
        assert!(
            msg.contains("too large") && msg.contains("99999999999tbit"),
            "{msg}"
        );
        let msg = rate_err("1.2.3mbit");
        assert!(msg.contains("\"1.2.3mbit\""), "{msg}");
        let msg = rate_err("99999999999999999999999999999999999999999");
        assert!(msg.contains("too large"), "{msg}");
    }

    #[test]
    fn sizes() {
        assert_eq!(size("0"), 0);
        assert_eq!(size("12"), 12);
        assert_eq!(size("12B"), 12);
        assert_eq!(size("20KB"), 20_000);
        assert_eq!(size("20MB"), 20_000_000);
        assert_eq!(size("40GB"), 40_000_000_000);
        assert_eq!(size("1TB"), 1_000_000_000_000);
        assert_eq!(size("1KiB"), 1024);
        assert_eq!(size("1MiB"), 1 << 20);
        assert_eq!(size("1.5GiB"), 3 << 29);
        assert_eq!(size("2tib"), 2 << 40);
        let msg = "20 parsecs".parse::<Size>().unwrap_err().to_string();
        assert!(msg.contains("\"parsecs\"") && msg.contains("MiB"), "{msg}");
        let msg = "-1GB".parse::<Size>().unwrap_err().to_string();
        assert!(msg.contains("negative") && msg.contains("-1GB"), "{msg}");
        let msg = "20000000EB".parse::<Size>().unwrap_err().to_string();
        assert!(msg.contains("\"EB\""), "{msg}");
        let msg = "20000000TB".parse::<Size>().unwrap_err().to_string();
        assert!(msg.contains("too large"), "{msg}");
    }

    #[test]
    fn intervals() {
        let ms = |s: &str| s.parse::<Interval>().unwrap().duration().as_millis();
        assert_eq!(ms("1s"), 1000);
        assert_eq!(ms("250ms"), 250);
        assert_eq!(ms("1.5s"), 1500);
        assert_eq!(ms("2m"), 120_000);
        assert_eq!(ms("1h"), 3_600_000);
        let msg = "1 fortnight".parse::<Interval>().unwrap_err().to_string();
        assert!(msg.contains("fortnight") && msg.contains("ms, s"), "{msg}");
    }

    #[test]
    fn printing_is_exact_and_short() {
        assert_eq!(Rate(2_000_000).to_string(), "2mbit");
        assert_eq!(Rate(1_500_000).to_string(), "1500kbit");
        assert_eq!(Rate(1234).to_string(), "1234bit");
        assert_eq!(Rate(0).to_string(), "0bit");
        assert_eq!(Size(1 << 30).to_string(), "1GiB");
        assert_eq!(Size(20_000_000).to_string(), "20MB");
        assert_eq!(Size(7).to_string(), "7B");
        assert_eq!(Interval::from_millis(1000).to_string(), "1s");
        assert_eq!(Interval::from_millis(90_000).to_string(), "90s");
        assert_eq!(Interval::from_millis(120_000).to_string(), "2m");
        assert_eq!(Rate(1_534_000).human(), "1.53mbit");
        assert_eq!(Size(999).human(), "999B");
    }

    #[test]
    fn rate_pairs() {
        let p: RatePair = "2mbit".parse().unwrap();
        assert_eq!(p.up, Some(Rate(2_000_000)));
        assert_eq!(p.down, Some(Rate(2_000_000)));
        let p: RatePair = "1mbit:8mbit".parse().unwrap();
        assert_eq!(
            (p.up, p.down),
            (Some(Rate(1_000_000)), Some(Rate(8_000_000)))
        );
        let p: RatePair = "unlimited:8mbit".parse().unwrap();
        assert_eq!((p.up, p.down), (None, Some(Rate(8_000_000))));
        assert_eq!(p.to_string(), "unlimited:8mbit");
        assert_eq!("3m".parse::<RatePair>().unwrap().to_string(), "3mbit");
        let msg = "1mbit:8mbps".parse::<RatePair>().unwrap_err().to_string();
        assert!(msg.contains("8mbps"), "{msg}");
    }

    #[test]
    fn rates_below_the_floor_are_refused_naming_unlimited() {
        for input in ["0", "0bit", "0mbit", "7999", "7.999kbit", "999B/s"] {
            let msg = rate_err(input);
            assert!(
                msg.contains(&format!("{input:?}")) && msg.contains("smallest, 8kbit"),
                "{input}: {msg}"
            );
            assert!(msg.contains("\"unlimited\""), "{input}: {msg}");
        }
        assert_eq!(rate("8kbit"), Rate::MIN.bits_per_sec());
        assert_eq!(rate("8000"), 8000);
        let msg = "0:0".parse::<RatePair>().unwrap_err().to_string();
        assert!(msg.contains("\"0\"") && msg.contains("8kbit"), "{msg}");
    }

    #[test]
    fn rates_above_the_ceiling_are_refused() {
        assert_eq!(rate("1tbit"), Rate::MAX.bits_per_sec());
        for input in [
            "18446744073709551615bit",
            "1000000000001",
            "2tbit",
            "200GB/s",
        ] {
            let msg = rate_err(input);
            assert!(
                msg.contains("too large") && msg.contains("the largest is 1tbit"),
                "{input}: {msg}"
            );
        }
    }

    #[test]
    fn fractions_must_come_out_whole_with_or_without_a_unit() {
        assert_eq!(rate("1.5mbit"), 1_500_000);
        assert_eq!(rate("12.5kbit"), 12_500);
        assert_eq!(rate("10000.0"), 10_000);
        assert_eq!(rate("10000.000bit"), 10_000);
        assert_eq!(rate("1.5KiB/s"), 12 * 1024);
        for input in ["10000.5", "10000.5bit", "1.0000001kbit", "0.5"] {
            let msg = rate_err(input);
            assert!(
                msg.contains("not a whole number of bits per second"),
                "{input}: {msg}"
            );
        }
        assert_eq!(size("1.5KB"), 1500);
        let msg = "1.5B".parse::<Size>().unwrap_err().to_string();
        assert!(msg.contains("not a whole number of bytes"), "{msg}");
        let msg = "1.5ms".parse::<Interval>().unwrap_err().to_string();
        assert!(msg.contains("not a whole number of milliseconds"), "{msg}");
    }

    #[test]
    fn durations_need_a_unit() {
        for input in ["5", "0", "1.5"] {
            let msg = input.parse::<Interval>().unwrap_err().to_string();
            assert!(
                msg.contains(&format!("interval {input:?} has no unit")) && msg.contains("500ms"),
                "{input}: {msg}"
            );
        }
    }

    #[test]
    fn bare_numbers_in_ron_follow_the_string_rules() {
        let de = |text: &str| ron::from_str::<Interval>(text).map_err(|e| e.to_string());
        let msg = de("5").unwrap_err();
        assert!(msg.contains("has no unit"), "{msg}");
        assert_eq!(de("\"5s\"").unwrap().duration().as_millis(), 5000);
        let rate = |text: &str| ron::from_str::<Rate>(text).map_err(|e| e.to_string());
        assert_eq!(rate("20000000").unwrap().bits_per_sec(), 20_000_000);
        assert!(rate("0").unwrap_err().contains("smallest"));
        assert!(rate("-1").unwrap_err().contains("negative"));
        assert!(rate("10000.5").unwrap_err().contains("not a whole number"));
        assert_eq!(ron::from_str::<Size>("12").unwrap().bytes(), 12);
    }

    proptest! {
        #[test]
        fn rates_outside_the_range_never_parse(bits in prop_oneof![0..Rate::MIN.0, Rate::MAX.0 + 1..=u64::MAX]) {
            prop_assert!(Rate(bits).to_string().parse::<Rate>().is_err());
        }
    }

    proptest! {
        #[test]
        fn rate_round_trips(bits in Rate::MIN.0..=Rate::MAX.0) {
            let r = Rate(bits);
            prop_assert_eq!(r.to_string().parse::<Rate>().unwrap(), r);
        }

        #[test]
        fn size_round_trips(bytes in any::<u64>()) {
            let s = Size(bytes);
            prop_assert_eq!(s.to_string().parse::<Size>().unwrap(), s);
        }

        #[test]
        fn interval_round_trips(ms in 0u64..1u64 << 50) {
            let i = Interval::from_millis(ms);
            prop_assert_eq!(i.to_string().parse::<Interval>().unwrap(), i);
        }

        #[test]
        fn scaled_rates_parse(n in 0u64..1_000_000, unit in prop::sample::select(vec![
            ("bit", 1u64), ("kbit", 1000), ("mbit", 1_000_000), ("KB/s", 8000), ("MiB/s", 8 << 20),
        ])) {
            let bits = n * unit.1;
            let parsed = format!("{n}{}", unit.0).parse::<Rate>();
            if (Rate::MIN.0..=Rate::MAX.0).contains(&bits) {
                prop_assert_eq!(parsed.unwrap().bits_per_sec(), bits);
            } else {
                prop_assert!(parsed.is_err());
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,20}") {
            let _ = s.parse::<Rate>();
            let _ = s.parse::<Size>();
            let _ = s.parse::<Interval>();
        }
    }
}
