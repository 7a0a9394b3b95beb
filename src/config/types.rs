//! Leaf value types of the config: durations, addresses, secrets.
//!
//! Each type parses itself during deserialization so that a bad value is reported at its own
//! path (and so its own file:line:column) with what was expected and what was found.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the human way: `250ms`, `30s`, `1m30s`, `2h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like 250ms, 30s or 1m30s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim())
                    .map(Duration)
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
            // A bare number is ambiguous (seconds? milliseconds?): refuse it with a hint.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::invalid_value(Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a server listens or a peer is reached: `host:port` (IPv4 or `[IPv6]`) or
/// `unix:/path/to.sock`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => a.fmt(f),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(());
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| ())
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Address;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an address like 127.0.0.1:9901, [::1]:9901 or unix:/run/app.sock (IP literal, port 0-65535)",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Address, E> {
                v.trim()
                    .parse()
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// A TCP socket address (`host:port` with an IP literal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpAddress(pub SocketAddr);

impl Serialize for TcpAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TcpAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TcpAddress;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a TCP address like 127.0.0.1:9901 or [::1]:9901 (IP literal, port 0-65535)",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TcpAddress, E> {
                v.trim()
                    .parse()
                    .map(TcpAddress)
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// A value that must never be printed: logs, `/config` and `outrigger check` show it as
/// `<redacted>`. It must be written as a string: a number or a boolean is refused — YAML would
/// change it (`0042` is read as 42, `0x1F` as 31, `1.50` as 1.5) — and no refusal repeats the
/// value (serde's own type errors quote it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        /// Says what kind of value was found, never the value.
        fn refuse<E: de::Error>(found: &str) -> E {
            E::custom(format!(
                "expected a string, found {found}: write the secret in quotes"
            ))
        }
        impl<'de> Visitor<'de> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(refuse("a number"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(refuse("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(refuse("a number"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(refuse("a boolean"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(refuse("a list"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(refuse("a map"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Secret, E> {
                Err(refuse("nothing"))
            }
        }
        d.deserialize_any(V)
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A size in bytes: a plain number, or a number with a unit (`512KiB`, `4MiB`, `1GiB`, `10MB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl std::str::FromStr for ByteSize {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num.parse().map_err(|_| ())?;
        let mult: usize = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or(())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 4MiB, 512KiB or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v as usize))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                usize::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse()
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        let d: Duration = serde_json::from_str("\"1m30s\"").unwrap();
        assert_eq!(d.get(), std::time::Duration::from_secs(90));
        let err = serde_json::from_str::<Duration>("30")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a duration with a unit"), "{err}");
        let err = serde_json::from_str::<Duration>("\"30 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"30 parsecs\""), "{err}");
    }

    #[test]
    fn addresses() {
        let a: Address = serde_json::from_str("\"unix:/tmp/a.sock\"").unwrap();
        assert_eq!(a, Address::Unix("/tmp/a.sock".into()));
        let a: Address = serde_json::from_str("\"[::1]:80\"").unwrap();
        assert_eq!(a, Address::Tcp("[::1]:80".parse().unwrap()));
        assert!(serde_json::from_str::<Address>("\"localhost:99999\"").is_err());
        assert!(serde_json::from_str::<Address>("\"unix:\"").is_err());
    }

    #[test]
    fn secrets_written_as_numbers_are_refused_and_never_echoed() {
        for text in [
            "4242424242",
            "1.50",
            "0x1F",
            "true",
            "[4242424242]",
            "{a: 4242424242}",
        ] {
            let e = serde_norway::from_str::<Secret>(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("write the secret in quotes"), "{text}: {e}");
            for digits in ["4242424242", "1.5", "31", "0x1F"] {
                assert!(!e.contains(digits), "{text}: {e}");
            }
        }
        let s: Secret = serde_norway::from_str("'0042'").unwrap();
        assert_eq!(s.expose(), "0042");
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn sizes() {
        assert_eq!("4MiB".parse::<ByteSize>(), Ok(ByteSize(4 << 20)));
        assert_eq!("100".parse::<ByteSize>(), Ok(ByteSize(100)));
        assert_eq!("2 KiB".parse::<ByteSize>(), Ok(ByteSize(2048)));
        assert!("4 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }
}
