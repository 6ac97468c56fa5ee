//! TensorBoard event files, written directly: each record is an `Event` protobuf (the few
//! message types below, field numbers from TensorFlow's `event.proto`, `summary.proto` and
//! `tensor.proto`) in TFRecord framing — the length as u64 little-endian, its masked CRC32C,
//! the bytes, their masked CRC32C. What TensorBoard, `wandb sync --sync-tensorboard` and the
//! Hub's "Training metrics" tab read.
//!
//! Scalars are `simple_value`s (f32, as `SummaryWriter.add_scalar` writes them), text is a
//! string tensor for the text plugin (as `add_text` writes it). A run directory holds one file
//! that is only ever appended to; [`EventWriter::resume`] cuts it back to the length a
//! checkpoint recorded, so a resumed run never leaves two values for one step.

use anyhow::{bail, Context, Result};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
    /// Which program wrote the file (on the file-version event).
    #[prost(message, optional, tag = "10")]
    pub source_metadata: Option<SourceMetadata>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SourceMetadata {
    #[prost(string, tag = "1")]
    pub writer: String,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first record of every file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 8")]
    pub kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// `DataType`; [`DT_STRING`] for text.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// TensorFlow's `DT_STRING`.
pub const DT_STRING: i32 = 7;

/// TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant, so that a CRC of data
/// that itself holds CRCs stays well distributed.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record in TFRecord framing.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Every event of a file, checking both CRCs of every record; an error names the file, the
/// record and its byte offset.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{}: record {} at byte {at}: {what}",
                path.display(),
                events.len()
            )
        };
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated header"))?;
        let (len_bytes, len_crc) = header.split_at(8);
        if masked_crc(len_bytes).to_le_bytes() != len_crc {
            return Err(bad("length CRC does not match"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("truncated data"))?;
        let data_crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("truncated data CRC"))?;
        if masked_crc(data).to_le_bytes() != data_crc {
            return Err(bad("data CRC does not match"));
        }
        events.push(Event::decode(data).map_err(|e| bad(&format!("not an Event: {e}")))?);
        at += 16 + len;
    }
    Ok(events)
}

/// How far an events file is valid: what a checkpoint records (the path relative to
/// `output_dir`, so that a moved run still resumes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub file: PathBuf,
    pub bytes: u64,
}

/// Appends events to one file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
    bytes: u64,
}

impl EventWriter {
    /// A new file in `dir` (created if missing), named as PyTorch's `SummaryWriter` names it
    /// (`events.out.tfevents.<seconds>.<host>.<pid>.0`), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.0",
            now().floor() as u64,
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = EventWriter {
            file,
            path,
            bytes: 0,
        };
        writer.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
            source_metadata: Some(SourceMetadata {
                writer: "dpo-sam".into(),
            }),
        })?;
        Ok(writer)
    }

    /// The file at `path` cut back to `bytes` (what a checkpoint saw), for appending. Fails
    /// when the file is missing or shorter, since the events up to the checkpoint are gone.
    pub fn resume(path: &Path, bytes: u64) -> Result<EventWriter> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        if len < bytes {
            bail!(
                "{} has {len} bytes, fewer than the {bytes} the checkpoint recorded",
                path.display()
            );
        }
        file.set_len(bytes)
            .with_context(|| format!("cannot truncate {}", path.display()))?;
        let mut writer = EventWriter {
            file,
            path: path.to_path_buf(),
            bytes,
        };
        std::io::Seek::seek(&mut writer.file, std::io::SeekFrom::Start(bytes))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far, after syncing them to disk: the length a checkpoint can rely on.
    pub fn sync(&mut self) -> Result<u64> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot sync {}", self.path.display()))?;
        Ok(self.bytes)
    }

    /// Scalars of one step, as one event (`(tag, value)`; non-finite values are skipped, as
    /// metrics.jsonl writes them as null).
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> Result<()> {
        let value: Vec<SummaryValue> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| scalar_value(tag, *v))
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.summary(step, value)
    }

    /// Markdown texts of one step for the text plugin, under `<tag>/text_summary` as
    /// `SummaryWriter.add_text` names them.
    pub fn texts(&mut self, step: i64, texts: &[(String, String)]) -> Result<()> {
        let value = texts
            .iter()
            .map(|(tag, text)| text_value(tag, text))
            .collect();
        self.summary(step, value)
    }

    fn summary(&mut self, step: i64, value: Vec<SummaryValue>) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step,
            what: Some(What::Summary(Summary { value })),
            source_metadata: None,
        })
    }

    /// One record in one `write` call, so that a killed process leaves at most a torn last
    /// record, which the next checkpoint's length excludes.
    fn write(&mut self, event: &Event) -> Result<()> {
        let record = frame(&event.encode_to_vec());
        self.file
            .write_all(&record)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.bytes += record.len() as u64;
        Ok(())
    }
}

/// A scalar as `SummaryWriter.add_scalar` stores it: a float32 `simple_value`.
fn scalar_value(tag: &str, v: f64) -> SummaryValue {
    SummaryValue {
        tag: tag.to_string(),
        metadata: None,
        kind: Some(Kind::SimpleValue(v as f32)),
    }
}

/// A text as `SummaryWriter.add_text` stores it: a one-element string tensor for the text
/// plugin under `<tag>/text_summary`.
fn text_value(tag: &str, text: &str) -> SummaryValue {
    SummaryValue {
        tag: format!("{tag}/text_summary"),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".into(),
                // TextPluginData { version: 0 }: all defaults, so empty.
                content: Vec::new(),
            }),
        }),
        kind: Some(Kind::Tensor(TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShape {
                dim: vec![Dim { size: 1 }],
            }),
            string_val: vec![text.as_bytes().to_vec()],
        })),
    }
}

/// Seconds since the Unix epoch.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name (`localhost` when it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "localhost".into(),
    }
}

/// A run directory's name as `transformers` makes it: local time and host,
/// `Dec01_14-03-59_myhost`.
pub fn run_name() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now() as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which the call borrows.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!(
        "{}{:02}_{:02}-{:02}-{:02}_{}",
        MONTHS[tm.tm_mon.clamp(0, 11) as usize],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        hostname()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorboards() {
        // Values from tensorboard's own `masked_crc32c` (tensorflow_stub.pywrap_tensorflow).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"foo"), 0xfebe_8a61);
        assert_eq!(masked_crc(&0u64.to_le_bytes()), 0x0798_0329);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn events_read_back_with_their_crcs_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(
            3,
            &[("train/loss".into(), 0.5), ("train/nan".into(), f64::NAN)],
        )
        .unwrap();
        w.texts(3, &[("args".into(), "lr = 1".into())]).unwrap();
        let len = w.sync().unwrap();
        let path = w.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("{:?}", events[1])
        };
        assert_eq!(events[1].step, 3);
        assert_eq!(s.value.len(), 1, "the NaN is skipped");
        assert_eq!(s.value[0].tag, "train/loss");
        assert_eq!(s.value[0].kind, Some(Kind::SimpleValue(0.5)));
        let Some(What::Summary(s)) = &events[2].what else {
            panic!()
        };
        assert_eq!(s.value[0].tag, "args/text_summary");
        let Some(Kind::Tensor(t)) = &s.value[0].kind else {
            panic!()
        };
        assert_eq!((t.dtype, &t.string_val[0][..]), (DT_STRING, &b"lr = 1"[..]));

        // A flipped byte in the data is caught by its CRC, a cut file by the framing.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_events(&path).unwrap_err().to_string();
        assert!(e.contains("record 2") && e.contains("data CRC"), "{e}");
        std::fs::write(&path, &bytes[..n - 3]).unwrap();
        let e = read_events(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    /// PyTorch's `SummaryWriter` wrote the fixture (scripts/make_tensorboard_fixture.py):
    /// every record reads back with both CRCs checked and re-encodes to the very same bytes,
    /// and its scalars and text are the values dpo-sam's writer makes for them.
    #[test]
    fn pytorchs_summary_writer_file_reads_back_and_reencodes_byte_for_byte() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tensorboard/events.out.tfevents.fixture");
        let bytes = std::fs::read(&path).unwrap();
        let events = read_events(&path).unwrap();
        let again: Vec<u8> = events
            .iter()
            .flat_map(|e| frame(&e.encode_to_vec()))
            .collect();
        assert_eq!(again, bytes, "framing, CRCs and protobuf encoding");
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let mut scalars = Vec::new();
        for e in &events[1..] {
            let Some(What::Summary(s)) = &e.what else {
                panic!("{e:?}")
            };
            assert_eq!(s.value.len(), 1);
            let v = &s.value[0];
            match &v.kind {
                Some(Kind::SimpleValue(x)) => {
                    assert_eq!(*v, scalar_value(&v.tag, *x as f64));
                    scalars.push((e.step, v.tag.as_str(), *x));
                }
                _ => {
                    assert_eq!(e.step, 0);
                    let text = "    learning_rate = 0.005\n    beta = 0.1";
                    assert_eq!(*v, text_value("args", text));
                }
            }
        }
        assert_eq!(
            scalars,
            [
                (1, "train/loss", 0.6925),
                (1, "train/rewards/accuracies", 0.5),
                (2, "train/loss", 0.6123),
                (2, "train/rewards/accuracies", 0.75),
                (2, "eval/loss", 0.65),
            ]
        );
    }

    #[test]
    fn resume_cuts_the_file_back_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("train/loss".into(), 1.0)]).unwrap();
        let at = w.sync().unwrap();
        w.scalars(2, &[("train/loss".into(), 2.0)]).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        // A torn record after the checkpoint, as a kill mid-write leaves.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[1, 2, 3])
            .unwrap();
        let mut w = EventWriter::resume(&path, at).unwrap();
        w.scalars(2, &[("train/loss".into(), 2.5)]).unwrap();
        let steps: Vec<(i64, Option<Kind>)> = read_events(&path)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.what {
                Some(What::Summary(s)) => Some((e.step, s.value[0].kind.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            steps,
            vec![
                (1, Some(Kind::SimpleValue(1.0))),
                (2, Some(Kind::SimpleValue(2.5)))
            ]
        );
        let e = EventWriter::resume(&path, 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("fewer than"), "{e}");
    }

    #[test]
    fn run_names_look_like_transformers_ones() {
        let name = run_name();
        // `Dec01_14-03-59` is 14 characters.
        let (date, host) = name.split_at(14);
        assert!(host.starts_with('_') && host.len() > 1, "{name}");
        assert_eq!(&date[5..6], "_", "{name}");
        assert_eq!(date.matches('-').count(), 2, "{name}");
    }
}
