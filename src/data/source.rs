//! Where records come from: data source specs (files, globs, Hub dataset repos) expanded to a
//! list of files, and a lazy reader of each file's records as JSON values. Nothing is read
//! before it is needed, so a multi-GB file streams in constant memory: JSONL line by line,
//! a JSON array element by element, parquet row group by row group.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a record was found: the file and its 1-based line (row number for parquet).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A row that cannot become a preference pair, with the reason it is counted under.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub origin: Origin,
    /// Stable snake_case name used in the skip summary and metrics.
    pub reason: &'static str,
    pub detail: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.origin, self.detail, self.reason)
    }
}

impl std::error::Error for RowError {}

/// Extensions the readers understand, longest first so `.jsonl.gz` wins over `.gz`.
const DATA_EXTENSIONS: &[&str] = &[".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet"];

fn is_data_file(name: &str) -> bool {
    DATA_EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// Expands source specs to files, in the order given (globs sorted, so runs are reproducible).
///
/// A spec is a local file, a glob (`data/*.jsonl.gz`), or a Hub dataset repo: `hub:ORG/NAME`,
/// or plain `ORG/NAME` when no such local path exists and the name has no data-file extension,
/// optionally `@REVISION` and `:SPLIT` (default `default_split`).
pub fn expand(specs: &[&str], default_split: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for spec in specs {
        if spec.starts_with("builtin:") {
            bail!("data source `{spec}`: built-in data cannot be mixed with files");
        }
        match classify(spec) {
            Spec::Hub(repo) => files.extend(hub_files(repo, default_split)?),
            Spec::Glob => {
                let mut matched: Vec<PathBuf> = glob::glob(spec)
                    .with_context(|| format!("data source `{spec}`: invalid glob pattern"))?
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("data source `{spec}`: cannot read a matched path"))?;
                if matched.is_empty() {
                    bail!("data source `{spec}`: the glob matches no file");
                }
                matched.sort();
                files.extend(matched);
            }
            Spec::File => files.push(PathBuf::from(spec)),
            Spec::Unknown => bail!(
                "data source `{spec}`: no such file (nor a glob, nor a Hub dataset `hub:ORG/NAME`)"
            ),
        }
    }
    for f in &files {
        let name = f.to_string_lossy();
        if !is_data_file(&name) {
            bail!(
                "data file {name}: expected one of {} ",
                DATA_EXTENSIONS.join(", ")
            );
        }
    }
    Ok(files)
}

/// What a source spec (not `builtin:`) names.
enum Spec<'a> {
    /// A Hub dataset repo, `ORG/NAME[@REV][:SPLIT]` (`hub:` stripped).
    Hub(&'a str),
    Glob,
    File,
    Unknown,
}

/// [`expand`]'s rules: `hub:ORG/NAME`; a glob; a local path; a plain `ORG/NAME` that is no
/// local path and has no data-file extension.
fn classify(spec: &str) -> Spec<'_> {
    let repo_id = |s: &str| crate::hub::looks_like_repo_id(s.split(':').next().unwrap_or(s));
    match spec.strip_prefix("hub:") {
        Some(repo) => Spec::Hub(repo),
        None if spec.contains(['*', '?', '[']) => Spec::Glob,
        None if Path::new(spec).exists() => Spec::File,
        None if !is_data_file(spec) && repo_id(spec) => Spec::Hub(spec),
        None => Spec::Unknown,
    }
}

/// The Hub dataset repo id a source spec names, if any, by [`expand`]'s rules, without
/// revision and split.
pub fn hub_dataset_id(spec: &str) -> Option<String> {
    let Spec::Hub(repo) = classify(spec) else {
        return None;
    };
    let id = repo.split([':', '@']).next().unwrap_or(repo);
    crate::hub::looks_like_repo_id(id).then(|| id.to_string())
}

/// The files of one split of a Hub dataset repo (`ORG/NAME[@REV][:SPLIT]`), through the
/// Hugging Face cache; offline, the listing comes from the cached snapshot.
fn hub_files(spec: &str, default_split: &str) -> Result<Vec<PathBuf>> {
    let (repo_id, split) = match spec.rsplit_once(':') {
        Some((r, s)) => (r, s),
        None => (spec, default_split),
    };
    let repo = crate::hub::HubRepo::dataset(repo_id);
    let listing = hub_listing(repo_id)?;
    let wanted: Vec<&String> = listing.iter().filter(|f| in_split(f, split)).collect();
    if wanted.is_empty() {
        let splits: std::collections::BTreeSet<String> = listing
            .iter()
            .filter(|f| is_data_file(f))
            .filter_map(|f| split_of(f))
            .collect();
        bail!(
            "Hub dataset `{repo_id}`: no data file for split `{split}` (splits found: {})",
            splits.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    wanted.into_iter().map(|f| repo.get(f)).collect()
}

/// `data/train_prefs-00000-of-00001.parquet` → `train_prefs`; `helpful-base/train.jsonl.gz` → `train`.
fn split_of(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let stem = name.split(['.', '-']).next()?;
    Some(stem.to_string())
}

/// Whether a repo file belongs to a split: its name's stem or one of its folders is the split.
fn in_split(path: &str, split: &str) -> bool {
    is_data_file(path)
        && (split_of(path).as_deref() == Some(split)
            || path.split('/').rev().skip(1).any(|d| d == split))
}

/// Every file name in a Hub dataset repo.
fn hub_listing(repo_id: &str) -> Result<Vec<String>> {
    let (id, revision) = repo_id.split_once('@').unwrap_or((repo_id, "main"));
    let cache = crate::hub::cache();
    // The cache layout of huggingface_hub: refs/REV holds the commit, snapshots/COMMIT the files.
    let repo_dir = cache
        .path()
        .join(format!("datasets--{}", id.replace('/', "--")));
    let snapshot = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .ok()
        .map(|commit| repo_dir.join("snapshots").join(commit.trim()));
    if crate::hub::offline() {
        let Some(dir) = snapshot.filter(|d| d.is_dir()) else {
            bail!(
                "Hub dataset `{repo_id}` is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; \
                 download it on a connected machine or point data.train at local files",
                cache.path().display()
            );
        };
        let mut out = Vec::new();
        list_dir(&dir, &dir, &mut out)?;
        return Ok(out);
    }
    let api = crate::hub::api()?;
    let repo = hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Dataset,
        revision.to_string(),
    );
    let info = api
        .repo(repo)
        .info()
        .with_context(|| format!("cannot list the Hub dataset `{repo_id}`"))?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

fn list_dir(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            list_dir(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// One record of a file: its JSON value, or why the row could not be read.
pub type RawRecord = std::result::Result<(Origin, Value), RowError>;

/// Opens a file for lazy reading; errors here (missing file, bad parquet footer) are fatal.
pub fn open(path: &Path) -> Result<Box<dyn Iterator<Item = RawRecord> + Send>> {
    open_counted(path, Arc::default())
}

/// [`open`], adding the bytes of the file read so far to `read` (what progress bars show): as
/// they are read for JSON, compressed or not; at the end for parquet, read by row group.
pub fn open_counted(
    path: &Path,
    read: Arc<AtomicU64>,
) -> Result<Box<dyn Iterator<Item = RawRecord> + Send>> {
    let name: Arc<str> = path.display().to_string().into();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open data file {name}"))?;
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".parquet") {
        let size = file.metadata().map_or(0, |m| m.len());
        let mut counted = false;
        let done = std::iter::from_fn(move || {
            if !std::mem::replace(&mut counted, true) {
                read.fetch_add(size, Ordering::Relaxed);
            }
            None
        });
        return Ok(Box::new(parquet_rows(file, name)?.chain(done)));
    }
    let file = Counted { inner: file, read };
    let mut reader: Box<dyn BufRead + Send> = if lower.ends_with(".gz") {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(file),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    };
    // `.json` may be an array or (as `datasets.Dataset.to_json` writes by default) JSON lines.
    let array = lower.trim_end_matches(".gz").ends_with(".json")
        && first_byte(&mut reader, &name)? == Some(b'[');
    if array {
        Ok(Box::new(JsonArray {
            reader,
            file: name,
            line: 1,
            started: false,
            done: false,
        }))
    } else {
        Ok(Box::new(JsonLines {
            reader,
            file: name,
            line: 0,
            buf: Vec::new(),
            done: false,
        }))
    }
}

/// A reader that adds the bytes it reads to a shared count.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn first_byte(reader: &mut Box<dyn BufRead + Send>, name: &str) -> Result<Option<u8>> {
    loop {
        let buf = reader
            .fill_buf()
            .with_context(|| format!("cannot read {name}"))?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => return Ok(Some(buf[i])),
            None if buf.is_empty() => return Ok(None),
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

fn row_error(file: &Arc<str>, line: usize, reason: &'static str, detail: String) -> RowError {
    RowError {
        origin: Origin {
            file: file.clone(),
            line,
        },
        reason,
        detail,
    }
}

/// Parses one record's bytes: UTF-8 first (so the reason is precise), then JSON.
fn parse_record(file: &Arc<str>, line: usize, bytes: &[u8]) -> RawRecord {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        row_error(
            file,
            line,
            "invalid_utf8",
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| row_error(file, line, "invalid_json", format!("invalid JSON: {e}")))?;
    Ok((
        Origin {
            file: file.clone(),
            line,
        },
        value,
    ))
}

struct JsonLines {
    reader: Box<dyn BufRead + Send>,
    file: Arc<str>,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl Iterator for JsonLines {
    type Item = RawRecord;

    fn next(&mut self) -> Option<RawRecord> {
        while !self.done {
            self.buf.clear();
            self.line += 1;
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(parse_record(&self.file, self.line, &self.buf));
                }
                Err(e) => {
                    // An I/O or gzip error ends the file: nothing after it can be trusted.
                    self.done = true;
                    return Some(Err(row_error(
                        &self.file,
                        self.line,
                        "unreadable",
                        format!("cannot read: {e}"),
                    )));
                }
            }
        }
        None
    }
}

/// A top-level JSON array read one element at a time: bytes are scanned for the element's end
/// (depth 0 outside strings), then that element alone is parsed.
struct JsonArray {
    reader: Box<dyn BufRead + Send>,
    file: Arc<str>,
    /// Line of the next unread byte.
    line: usize,
    started: bool,
    done: bool,
}

impl JsonArray {
    fn byte(&mut self) -> std::io::Result<Option<u8>> {
        let mut b = [0u8];
        match self.reader.read(&mut b)? {
            0 => Ok(None),
            _ => {
                if b[0] == b'\n' {
                    self.line += 1;
                }
                Ok(Some(b[0]))
            }
        }
    }

    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            match self.byte()? {
                Some(b) if b.is_ascii_whitespace() => continue,
                other => return Ok(other),
            }
        }
    }

    fn fail(&mut self, line: usize, reason: &'static str, detail: String) -> Option<RawRecord> {
        self.done = true;
        Some(Err(row_error(&self.file, line, reason, detail)))
    }

    fn next_element(&mut self) -> std::io::Result<Option<RawRecord>> {
        if !self.started {
            self.started = true;
            if self.skip_ws()? != Some(b'[') {
                return Ok(self.fail(self.line, "invalid_json", "expected a JSON array".into()));
            }
        }
        let mut first = self.skip_ws()?;
        if first == Some(b',') {
            first = self.skip_ws()?;
        }
        let start_line = self.line;
        let Some(first) = first else {
            return Ok(self.fail(start_line, "invalid_json", "unterminated JSON array".into()));
        };
        if first == b']' {
            self.done = true;
            return Ok(None);
        }
        let mut bytes = vec![first];
        let (mut depth, mut in_str, mut escaped) = (0i64, false, false);
        let mut b = first;
        loop {
            if in_str {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_str = false;
                }
            } else {
                match b {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => depth -= 1,
                    _ => {}
                }
            }
            if depth == 0 && !in_str && matches!(b, b'}' | b']' | b'"') {
                break;
            }
            match self.byte()? {
                Some(next) if depth == 0 && !in_str && (next == b',' || next == b']') => {
                    if next == b']' {
                        self.done = true;
                    }
                    break;
                }
                Some(next) => {
                    bytes.push(next);
                    b = next;
                }
                None => {
                    return Ok(self.fail(
                        start_line,
                        "invalid_json",
                        "unterminated JSON array".into(),
                    ))
                }
            }
        }
        Ok(Some(parse_record(&self.file, start_line, &bytes)))
    }
}

impl Iterator for JsonArray {
    type Item = RawRecord;

    fn next(&mut self) -> Option<RawRecord> {
        if self.done {
            return None;
        }
        match self.next_element() {
            Ok(r) => r,
            Err(e) => {
                let line = self.line;
                self.fail(line, "unreadable", format!("cannot read: {e}"))
            }
        }
    }
}

fn parquet_rows(
    file: std::fs::File,
    name: Arc<str>,
) -> Result<Box<dyn Iterator<Item = RawRecord> + Send>> {
    use parquet::file::reader::SerializedFileReader;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{name}: not a readable parquet file: {e}"))?;
    let rows = reader
        .into_iter()
        .enumerate()
        .map(move |(i, row)| match row {
            Ok(row) => Ok((
                Origin {
                    file: name.clone(),
                    line: i + 1,
                },
                row_to_json(&row),
            )),
            Err(e) => Err(row_error(
                &name,
                i + 1,
                "unreadable",
                format!("cannot decode parquet row: {e}"),
            )),
        });
    Ok(Box::new(rows))
}

fn row_to_json(row: &parquet::record::Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(k, v)| (k.clone(), field_to_json(v)))
            .collect(),
    )
}

fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Str(s) => Value::String(s.clone()),
        // Binary columns holding text (older writers omit the UTF8 annotation).
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Null,
        },
        F::Byte(v) => (*v).into(),
        F::Short(v) => (*v).into(),
        F::Int(v) => (*v).into(),
        F::Long(v) => (*v).into(),
        F::UByte(v) => (*v).into(),
        F::UShort(v) => (*v).into(),
        F::UInt(v) => (*v).into(),
        F::ULong(v) => (*v).into(),
        F::Float(v) => serde_json::Number::from_f64(*v as f64).map_or(Value::Null, Value::Number),
        F::Double(v) => serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
        F::Group(row) => row_to_json(row),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(field_to_json).collect()),
        F::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    (
                        field_to_json(k)
                            .as_str()
                            .map_or_else(|| k.to_string(), str::to_string),
                        field_to_json(v),
                    )
                })
                .collect(),
        ),
        // Dates, times and decimals never carry preference text; kept readable for `inspect`.
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_follow_hub_file_layouts() {
        assert!(in_split(
            "data/train_prefs-00000-of-00001.parquet",
            "train_prefs"
        ));
        assert!(!in_split(
            "data/train_prefs-00000-of-00001.parquet",
            "train"
        ));
        assert!(in_split("helpful-base/train.jsonl.gz", "train"));
        assert!(in_split("train/0000.parquet", "train"));
        assert!(!in_split("README.md", "train"));
        assert!(!in_split("data/test-00000-of-00001.parquet", "train"));
    }

    #[test]
    fn json_array_elements_stream_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        std::fs::write(
            &path,
            "[\n {\"a\": \"x]},\\\"\"},\n {\"a\": [1, {\"b\": 2}]}\n, 3, \"s\"\n]\n",
        )
        .unwrap();
        let rows: Vec<_> = open(&path).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].1["a"], "x]},\"");
        assert_eq!((rows[0].0.line, rows[1].0.line), (2, 3));
        assert_eq!(rows[1].1["a"][1]["b"], 2);
        assert_eq!(rows[3].1, "s");
    }
}
