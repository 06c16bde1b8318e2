//! The quota counts on disk: a snapshot (`quotas.state`) and the records appended since
//! (`quotas.journal`). Each flush appends only the counters that changed, one line each, and
//! fsyncs; a line holds an absolute count, so replaying the journal over the snapshot (last
//! line wins) is the state, and a replay twice is harmless. When the journal has grown past the
//! snapshot, both are compacted: a new snapshot is written under a name unique to this process,
//! fsynced and renamed over the old one, then the journal is emptied.
//!
//! Line format (tab-separated, names never hold tabs or newlines):
//! `route-id  quota-name  d|m  period-id  subject-hex  count  crc32-hex`, the CRC-32 covering
//! everything before its tab. A line that fails to parse or whose CRC disagrees (a torn last
//! write, corruption) is skipped and reported; a file that is not ours is an error naming it.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use crate::config::QuotaPeriod;

pub const SNAPSHOT_FILE: &str = "quotas.state";
pub const JOURNAL_FILE: &str = "quotas.journal";
const SNAPSHOT_HEADER: &str = "portcullis-quotas 2";
const JOURNAL_HEADER: &str = "portcullis-quotas-journal 2";
/// The header of the format before stable names (keys by route position).
pub const LEGACY_HEADER: &str = "portcullis-quotas 1";
/// The journal is compacted once it holds more than this many lines beyond the snapshot's.
const COMPACT_MIN_LINES: u64 = 100_000;

/// One quota count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub route: String,
    pub quota: String,
    pub period: QuotaPeriod,
    pub period_id: u32,
    pub subject: Vec<u8>,
    pub count: u64,
}

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Portcullis quota file (its first line is {first:?}, expected {expected:?}); move it away or point `quotas.data_dir` elsewhere")]
    Foreign {
        path: PathBuf,
        first: String,
        expected: &'static str,
    },
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<Record>,
    /// Lines of the legacy format (`hex-key count`), to be migrated by the caller.
    pub legacy: Vec<(Vec<u8>, u64)>,
    /// Lines skipped as unreadable: (file, line number, why), the first few.
    pub skipped: Vec<(PathBuf, usize, &'static str)>,
    pub skipped_total: usize,
}

impl Loaded {
    fn skip(&mut self, path: &Path, line: usize, why: &'static str) {
        self.skipped_total += 1;
        if self.skipped.len() < 10 {
            self.skipped.push((path.to_owned(), line, why));
        }
    }
}

fn encode(r: &Record, out: &mut String) {
    use std::fmt::Write as _;
    let start = out.len();
    let period = match r.period {
        QuotaPeriod::Day => 'd',
        QuotaPeriod::Month => 'm',
    };
    let _ = write!(
        out,
        "{}\t{}\t{period}\t{}\t{}\t{}",
        r.route,
        r.quota,
        r.period_id,
        hex::encode(&r.subject),
        r.count
    );
    let crc = crc32fast::hash(&out.as_bytes()[start..]);
    let _ = writeln!(out, "\t{crc:08x}");
}

fn decode(line: &str) -> Result<Record, &'static str> {
    let (body, crc) = line.rsplit_once('\t').ok_or("no checksum")?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| "bad checksum field")?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return Err("checksum mismatch");
    }
    let mut f = body.split('\t');
    let (Some(route), Some(quota), Some(period), Some(period_id), Some(subject), Some(count), None) = (
        f.next(),
        f.next(),
        f.next(),
        f.next(),
        f.next(),
        f.next(),
        f.next(),
    ) else {
        return Err("wrong number of fields");
    };
    Ok(Record {
        route: route.to_owned(),
        quota: quota.to_owned(),
        period: match period {
            "d" => QuotaPeriod::Day,
            "m" => QuotaPeriod::Month,
            _ => return Err("unknown period"),
        },
        period_id: period_id.parse().map_err(|_| "bad period id")?,
        subject: hex::decode(subject).map_err(|_| "bad subject")?,
        count: count.parse().map_err(|_| "bad count")?,
    })
}

/// The journal, open for appending.
pub struct Journal {
    dir: PathBuf,
    file: File,
    /// Lines appended since the last compaction.
    lines: u64,
    /// Lines in the snapshot at the last compaction.
    snapshot_lines: u64,
}

impl Journal {
    /// Reads the snapshot and the journal in `dir`, and opens the journal for appending.
    pub fn open(dir: &Path) -> Result<(Journal, Loaded), JournalError> {
        let mut loaded = Loaded::default();
        let snapshot = dir.join(SNAPSHOT_FILE);
        let snapshot_lines = read_file(&snapshot, &[SNAPSHOT_HEADER, LEGACY_HEADER], &mut loaded)?;
        let journal_path = dir.join(JOURNAL_FILE);
        let journal_lines = read_file(&journal_path, &[JOURNAL_HEADER], &mut loaded)?;
        let io = |source| JournalError::Io {
            path: journal_path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            writeln!(file, "{JOURNAL_HEADER}").map_err(io)?;
            file.sync_all().map_err(io)?;
            super::atomic_file::sync_dir(dir).map_err(io)?;
        }
        Ok((
            Journal {
                dir: dir.to_owned(),
                file,
                lines: journal_lines,
                snapshot_lines,
            },
            loaded,
        ))
    }

    /// Appends `records` and makes them durable.
    pub fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(records.len() * 64);
        for r in records {
            encode(r, &mut text);
        }
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()?;
        self.lines += records.len() as u64;
        Ok(())
    }

    /// Whether the journal has grown enough to be folded into a new snapshot.
    pub fn wants_compaction(&self) -> bool {
        self.lines > COMPACT_MIN_LINES.max(self.snapshot_lines)
    }

    /// Writes `all` as the new snapshot and empties the journal.
    pub fn compact(&mut self, all: &[Record]) -> std::io::Result<()> {
        let mut text = String::with_capacity(all.len() * 64 + 32);
        text.push_str(SNAPSHOT_HEADER);
        text.push('\n');
        for r in all {
            encode(r, &mut text);
        }
        // The mode File::create gives.
        super::atomic_file::replace(&self.dir, SNAPSHOT_FILE, text.as_bytes(), 0o666)?;
        // Replaying the old journal over the new snapshot would change nothing (absolute
        // counts), so a crash before this point loses nothing either.
        self.file.set_len(0)?;
        writeln!(self.file, "{JOURNAL_HEADER}")?;
        self.file.sync_all()?;
        self.lines = 0;
        self.snapshot_lines = all.len() as u64;
        Ok(())
    }
}

/// Reads one state file (absent is empty) into `loaded`; returns its record count.
fn read_file(
    path: &Path,
    headers: &[&'static str],
    loaded: &mut Loaded,
) -> Result<u64, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let mut reader = BufReader::new(file);
    let mut raw = Vec::new();
    let read_line = |reader: &mut BufReader<File>, raw: &mut Vec<u8>| {
        raw.clear();
        reader.read_until(b'\n', raw)
    };
    if read_line(&mut reader, &mut raw).map_err(io)? == 0 {
        // Empty (a crash right after creating it): nothing was recorded yet.
        return Ok(0);
    }
    let first = String::from_utf8_lossy(raw.strip_suffix(b"\n").unwrap_or(&raw)).into_owned();
    let Some(&header) = headers.iter().find(|h| **h == first) else {
        return Err(JournalError::Foreign {
            path: path.to_owned(),
            first: first.chars().take(40).collect(),
            expected: headers[0],
        });
    };
    let mut count = 0;
    let mut number = 1;
    loop {
        number += 1;
        if read_line(&mut reader, &mut raw).map_err(io)? == 0 {
            break;
        }
        let Some(line) = raw.strip_suffix(b"\n") else {
            loaded.skip(path, number, "torn last line (no newline)");
            break;
        };
        let Ok(line) = std::str::from_utf8(line) else {
            loaded.skip(path, number, "not UTF-8");
            continue;
        };
        if header == LEGACY_HEADER {
            match decode_legacy(line) {
                Some(entry) => loaded.legacy.push(entry),
                None => loaded.skip(path, number, "malformed line"),
            }
            continue;
        }
        match decode(line) {
            Ok(r) => {
                loaded.records.push(r);
                count += 1;
            }
            Err(why) => loaded.skip(path, number, why),
        }
    }
    Ok(count)
}

fn decode_legacy(line: &str) -> Option<(Vec<u8>, u64)> {
    let (key, count) = line.split_once(' ')?;
    Some((hex::decode(key).ok()?, count.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(count: u64) -> Record {
        Record {
            route: "api.example.com/v1/* GET".into(),
            quota: "consumer-5-per-day".into(),
            period: QuotaPeriod::Day,
            period_id: 20_000,
            subject: b"alice".to_vec(),
            count,
        }
    }

    #[test]
    fn lines_round_trip_and_corruption_is_caught() {
        let mut text = String::new();
        encode(&record(7), &mut text);
        assert_eq!(decode(text.trim_end()), Ok(record(7)));
        let flipped = text.trim_end().replacen("\t7\t", "\t8\t", 1);
        assert_eq!(decode(&flipped), Err("checksum mismatch"));
        assert_eq!(decode("garbage"), Err("no checksum"));
    }

    #[test]
    fn appends_replay_and_compaction_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, loaded) = Journal::open(dir.path()).unwrap();
        assert!(loaded.records.is_empty());
        j.append(&[record(1), record(2)]).unwrap();
        drop(j);
        let (mut j, loaded) = Journal::open(dir.path()).unwrap();
        assert_eq!(loaded.records.last(), Some(&record(2)));
        j.compact(&[record(2)]).unwrap();
        j.append(&[record(3)]).unwrap();
        drop(j);
        let (_, loaded) = Journal::open(dir.path()).unwrap();
        assert_eq!(loaded.records, [record(2), record(3)]);
    }

    #[test]
    fn torn_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&[record(4)]).unwrap();
        drop(j);
        // A write cut short by a crash: the last line has no newline.
        let path = dir.path().join(JOURNAL_FILE);
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(b"api\tq\td\t1\t");
        std::fs::write(&path, torn).unwrap();
        let (_, loaded) = Journal::open(dir.path()).unwrap();
        assert_eq!(loaded.records, [record(4)]);
        assert_eq!(loaded.skipped_total, 1);
        // Somebody else's file.
        std::fs::write(dir.path().join(SNAPSHOT_FILE), b"\x7fELF\x02\x01garbage").unwrap();
        let e = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("quotas.state") && e.contains("not a Portcullis quota file"),
            "{e}"
        );
    }
}
