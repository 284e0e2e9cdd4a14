//! Message types generated from `proto/` at build time (prost + pbjson serde).

#![allow(clippy::all, missing_docs)]

pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `google.protobuf.Timestamp` with canonical proto3 JSON (contract §1.4): RFC 3339 in
/// UTC with `Z` and 0, 3, 6 or 9 fractional digits; any RFC 3339 offset is accepted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let nanos = u32::try_from(self.nanos)
            .map_err(|_| serde::ser::Error::custom("timestamp nanos out of range"))?;
        let t = chrono::DateTime::<chrono::Utc>::from_timestamp(self.seconds, nanos)
            .ok_or_else(|| serde::ser::Error::custom("timestamp out of range"))?;
        s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let t = chrono::DateTime::parse_from_rfc3339(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid timestamp {text:?}: {e}")))?;
        Ok(Timestamp {
            seconds: t.timestamp(),
            nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
        })
    }
}

pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

#[cfg(test)]
mod tests {
    use super::Timestamp;

    #[test]
    fn timestamps_use_z() {
        let j =
            |seconds, nanos| serde_json::to_string(&Timestamp { seconds, nanos }).expect("json");
        assert_eq!(j(5, 6), "\"1970-01-01T00:00:05.000000006Z\"");
        assert_eq!(j(1_700_000_000, 0), "\"2023-11-14T22:13:20Z\"");
        assert_eq!(
            j(1_700_000_000, 120_000_000),
            "\"2023-11-14T22:13:20.120Z\""
        );
        let back: Timestamp =
            serde_json::from_str("\"2023-11-14T23:13:20.5+01:00\"").expect("parse");
        assert_eq!(
            back,
            Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000
            }
        );
    }
}
