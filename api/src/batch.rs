//! `deviceBatchSize`'s value, which the spec asks for and the status reports: a number, or `auto`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Sequences per GPU per micro-step: a number, or `auto` for the largest power of two that fits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceBatchSize {
    #[default]
    Auto,
    Fixed(i32),
}

impl std::fmt::Display for DeviceBatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceBatchSize::Auto => f.write_str("auto"),
            DeviceBatchSize::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for DeviceBatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DeviceBatchSize::Auto => s.serialize_str("auto"),
            DeviceBatchSize::Fixed(n) => s.serialize_i32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceBatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "deviceBatchSize must be auto or a whole number from 1 to 4096",
            )
        };
        match Raw::deserialize(d)? {
            Raw::Number(n) => i32::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .map(DeviceBatchSize::Fixed)
                .ok_or_else(bad),
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(DeviceBatchSize::Auto),
            Raw::Text(t) => t
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|n| *n >= 1)
                .map(DeviceBatchSize::Fixed)
                .ok_or_else(bad),
        }
    }
}

impl JsonSchema for DeviceBatchSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeviceBatchSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A number of sequences, or `auto`.",
            "x-kubernetes-int-or-string": true,
        })
    }
}
