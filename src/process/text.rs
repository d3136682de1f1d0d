//! [`ProcString`]: text a process chose for itself (its name, argv, the path it was started
//! from), kept as the bytes the kernel holds.
//!
//! Any process can call `prctl(PR_SET_NAME, b"\xff\xfe…")` or exec with arguments that are not
//! UTF-8. Reading such text as `String` fails (or empties it), and a process whose name cannot be
//! read would vanish from the policy's view and escape every rule. So identity is bytes all the
//! way into Lua (whose strings are byte strings); the lossy UTF-8 form is only for display and
//! for the keys of usage files, which are text.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes a process chose; usually, but not necessarily, UTF-8.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcString(Vec<u8>);

impl ProcString {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The display form: invalid UTF-8 sequences become U+FFFD. Control characters are kept
    /// (escape them where the text reaches a terminal or a log).
    pub fn to_str_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for ProcString {
    fn from(bytes: Vec<u8>) -> Self {
        ProcString(bytes)
    }
}

impl From<&[u8]> for ProcString {
    fn from(bytes: &[u8]) -> Self {
        ProcString(bytes.to_vec())
    }
}

impl From<&str> for ProcString {
    fn from(s: &str) -> Self {
        ProcString(s.as_bytes().to_vec())
    }
}

impl From<String> for ProcString {
    fn from(s: String) -> Self {
        ProcString(s.into_bytes())
    }
}

impl PartialEq<str> for ProcString {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for ProcString {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl fmt::Display for ProcString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_str_lossy())
    }
}

impl fmt::Debug for ProcString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => fmt::Debug::fmt(s, f),
            Err(_) => write!(f, "b\"{}\"", self.0.escape_ascii()),
        }
    }
}

/// A string when the bytes are UTF-8 (the common case, readable in snapshots), else bytes (RON
/// writes `b"…"`), so a recorded snapshot replays the exact name.
impl Serialize for ProcString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for ProcString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ProcString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a byte string")
            }
            fn visit_str<E>(self, v: &str) -> Result<ProcString, E> {
                Ok(ProcString::from(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<ProcString, E> {
                Ok(ProcString::from(v))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<ProcString, E> {
                Ok(ProcString(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ProcString, A::Error> {
                let mut bytes = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(ProcString(bytes))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_round_trips_through_ron_and_displays_lossily() {
        let name = ProcString::from(&b"\xff\xfeblockme"[..]);
        let text = ron::to_string(&name).unwrap();
        let back: ProcString = ron::from_str(&text).unwrap();
        assert_eq!(back, name);
        assert_eq!(name.to_string(), "\u{fffd}\u{fffd}blockme");
        let plain: ProcString = ron::from_str("\"curl\"").unwrap();
        assert_eq!(plain, "curl");
        assert_eq!(ron::to_string(&plain).unwrap(), "\"curl\"");
    }
}
