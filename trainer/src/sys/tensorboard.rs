//! TensorBoard scalars without TensorFlow: an `events.out.tfevents.*` file is a TFRecord stream
//! (length, masked CRC-32C, payload, masked CRC-32C) of `Event` protocol buffers. The messages are
//! the three fields of TensorFlow's `event.proto` / `summary.proto` we use, encoded by `prost`; the
//! CRC is the `crc32c` crate's. A resumed run starts a new file; TensorBoard merges the files of one
//! directory. Writing never stops training: errors become one warning.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

/// `tensorflow.Event`: wall time, step, and either the file version or a summary.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// `brain.Event:2`, the first record of every file.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value` (field 2 of its `value` oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let secs = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}",
            secs as u64,
            host.trim()
        ));
        let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
        };
        writer.record(&version_event(secs))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends scalars for one step; flushed so a reader sees them at once.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        self.record(&scalars_event(now(), step, values))?;
        self.out.flush()?;
        Ok(())
    }

    fn record(&mut self, event: &Event) -> Result<()> {
        self.out.write_all(&frame(&event.encode_to_vec()))?;
        Ok(())
    }
}

fn version_event(wall_time: f64) -> Event {
    Event {
        wall_time,
        step: 0,
        what: Some(What::FileVersion("brain.Event:2".into())),
    }
}

fn scalars_event(wall_time: f64, step: i64, values: &[(&str, f64)]) -> Event {
    let value = values
        .iter()
        .map(|(tag, v)| SummaryValue {
            tag: tag.to_string(),
            simple_value: Some(*v as f32),
        })
        .collect();
    Event {
        wall_time,
        step,
        what: Some(What::Summary(Summary { value })),
    }
}

/// One TFRecord: length (u64 LE), its masked CRC, the payload, the payload's masked CRC. Four
/// lines of framing, which no maintained crate offers on its own (the `tfrecord` crate brings
/// TensorFlow's whole protocol set and a code generator).
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masking, which keeps CRCs of data that holds CRCs well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xA282_EAD8)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    /// The bytes the hand-written encoder of earlier versions wrote for the same two records
    /// (taken from it before it was replaced): files stay byte-identical.
    #[test]
    fn records_match_the_earlier_encoder_byte_for_byte() {
        let mut file = frame(&version_event(1_700_000_000.25).encode_to_vec());
        let event = scalars_event(
            1_700_000_001.5,
            300,
            &[("train/loss", 1.5), ("val/bpc", 0.3)],
        );
        file.extend(frame(&event.encode_to_vec()));
        let hex: String = file.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "1800000000000000a37f4b220900001040fc54d9411a0d627261696e2e4576656e743a32338d2fe9\
             31000000000000009d8383e90900006040fc54d94110ac022a230a110a0a747261696e2f6c6f7373\
             150000c03f0a0e0a0776616c2f627063159a99993e74b47e82"
        );
        assert_eq!(
            Event::decode(&file[12..12 + 24]).unwrap(),
            version_event(1_700_000_000.25)
        );
    }

    #[test]
    fn records_frame_and_checksum_their_payload() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss", 1.5)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut pos = 0;
        let mut events = Vec::new();
        while pos < bytes.len() {
            let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
            let crc_len = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            assert_eq!(crc_len, masked_crc(&bytes[pos..pos + 8]));
            let data = &bytes[pos + 12..pos + 12 + len];
            let crc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).unwrap());
            pos += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("{events:?}")
        };
        assert_eq!(events[1].step, 7);
        assert_eq!(
            (s.value[0].tag.as_str(), s.value[0].simple_value),
            ("train/loss", Some(1.5))
        );
    }
}
