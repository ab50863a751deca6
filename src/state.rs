//! A peer's state directory (`--state-dir`): what it keeps across restarts.
//!
//! - `identity`: the peer's id and its secret key (its id is the public key). Written once,
//!   atomically (a temporary file, fsync, rename, fsync of the directory).
//! - `journal`: JSON lines, appended: each line this peer says, with its chain hash and the
//!   signature on each batch's head (before the `sent` event), and each batch of watermark
//!   changes with their chain hashes (before the lines are shown), fsynced before either is
//!   acknowledged. A crash can only tear the last record, which is ignored on the next start.
//!   The journal is rewritten in compact form at start and when it grows large, by the same
//!   atomic replace, so a crash at any moment leaves either the old or the new file.
//! - `lock`: held while the peer runs, so two peers never share one directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::chain::ChainHash;
use crate::id::{Hex, PeerId};
use crate::identity::{Identity, Signature};

/// The journal is compacted once this many bytes were appended since the last compaction.
const COMPACT_AFTER: u64 = 16 * 1024 * 1024;

/// Who this peer is, as kept across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IdentityFile {
    id: PeerId,
    /// The Ed25519 secret key (its seed).
    secret: Hex<32>,
}

/// A line this peer said, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnLine {
    pub seq: u64,
    pub name: String,
    pub text: String,
    pub sent_at_ms: u64,
    /// Its chain hash.
    pub hash: ChainHash,
    /// This peer's signature on the chain head here, when a batch ended here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<Signature>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Said(OwnLine),
    Marks(BTreeMap<PeerId, (u64, ChainHash)>),
    /// Own lines up to here were let go, with the chain hash there (written by compaction).
    Floor(u64, ChainHash),
}

/// What a previous run left.
#[derive(Debug, Default)]
pub struct Restored {
    pub my_seq: u64,
    /// Own lines, oldest first (the history decides which are still worth keeping).
    pub own: Vec<OwnLine>,
    /// Where own lines that had left the history ended.
    pub floor: Option<(u64, ChainHash)>,
    pub marks: BTreeMap<PeerId, (u64, ChainHash)>,
}

pub struct StateDir {
    dir: PathBuf,
    journal: BufWriter<File>,
    appended: u64,
    _lock: File,
}

impl StateDir {
    /// Opens (or creates) a state directory: the identity it holds (a fresh one on a first
    /// start) and what the previous run left.
    pub fn open(dir: &Path) -> anyhow::Result<(StateDir, Identity, Restored)> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
        let lock = File::create(dir.join("lock")).with_context(|| format!("cannot write in {}", dir.display()))?;
        if lock.try_lock().is_err() {
            bail!("state directory {} is in use by another peer", dir.display());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The identity holds a secret key: keep the directory to its owner.
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let identity = match fs::read(dir.join("identity")) {
            Ok(bytes) => read_identity(dir, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let identity = Identity::generate();
                let file = IdentityFile { id: identity.id(), secret: identity.secret() };
                replace(dir, "identity", &serde_json::to_vec(&file)?)?;
                identity
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}/identity", dir.display())),
        };
        let restored = read_journal(&dir.join("journal"))?;
        let journal = OpenOptions::new().create(true).append(true).open(dir.join("journal"))?;
        let mut state = StateDir { dir: dir.to_owned(), journal: BufWriter::new(journal), appended: 0, _lock: lock };
        let floor = restored.floor.unwrap_or((0, crate::chain::genesis(&identity.id())));
        state.compact(&restored.own, floor, &restored.marks)?;
        Ok((state, identity, restored))
    }

    pub fn said(&mut self, line: &OwnLine) -> io::Result<()> {
        self.append(&Record::Said(line.clone()))
    }

    pub fn marks(&mut self, marks: BTreeMap<PeerId, (u64, ChainHash)>) -> io::Result<()> {
        if marks.is_empty() { Ok(()) } else { self.append(&Record::Marks(marks)) }
    }

    /// Hands everything appended so far to the operating system: it survives this process
    /// being killed (not a power loss: that is [`sync`](Self::sync)).
    pub fn flush(&mut self) -> io::Result<()> {
        self.journal.flush()
    }

    /// Makes everything appended so far durable, also against a power loss.
    pub fn sync(&mut self) -> io::Result<()> {
        self.journal.flush()?;
        self.journal.get_ref().sync_data()
    }

    /// Whether the journal has grown enough to be worth compacting.
    pub fn wants_compaction(&self) -> bool {
        self.appended > COMPACT_AFTER
    }

    /// Rewrites the journal as the given own lines, own floor and watermarks, atomically.
    pub fn compact(
        &mut self,
        own: &[OwnLine],
        floor: (u64, ChainHash),
        marks: &BTreeMap<PeerId, (u64, ChainHash)>,
    ) -> io::Result<()> {
        let mut text = Vec::new();
        for record in [Record::Floor(floor.0, floor.1), Record::Marks(marks.clone())] {
            serde_json::to_writer(&mut text, &record)?;
            text.push(b'\n');
        }
        for line in own {
            serde_json::to_writer(&mut text, &Record::Said(line.clone()))?;
            text.push(b'\n');
        }
        self.journal.flush()?;
        replace(&self.dir, "journal", &text)?;
        let file = OpenOptions::new().append(true).open(self.dir.join("journal"))?;
        self.journal = BufWriter::new(file);
        self.appended = 0;
        Ok(())
    }

    fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.appended += line.len() as u64;
        self.journal.write_all(&line)
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new content.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The identity file: version 2's, or a clear word that an older one cannot be used.
fn read_identity(dir: &Path, bytes: &[u8]) -> anyhow::Result<Identity> {
    let file: IdentityFile = serde_json::from_slice(bytes).with_context(|| {
        format!(
            "{}/identity is damaged, or was written by a protocol 1 peer (whose id is no public key): use a new --state-dir",
            dir.display()
        )
    })?;
    let identity = Identity::from_secret(file.secret.0);
    anyhow::ensure!(identity.id() == file.id, "{}/identity is damaged: its id is not its key's", dir.display());
    Ok(identity)
}

fn read_journal(path: &Path) -> anyhow::Result<Restored> {
    let mut restored = Restored::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(restored),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Record>(&line) {
            Ok(Record::Said(own)) => {
                restored.my_seq = restored.my_seq.max(own.seq);
                restored.own.push(own);
            }
            Ok(Record::Marks(marks)) => restored.marks.extend(marks),
            Ok(Record::Floor(seq, head)) => {
                restored.my_seq = restored.my_seq.max(seq);
                restored.floor = Some((seq, head));
            }
            Err(_) => {
                // Only the last record can be torn by a crash; anything after it is ignored.
                tracing::warn!("{}: ignoring a damaged record at line {} and what follows", path.display(), n + 1);
                break;
            }
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Hex;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshlab-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn line(seq: u64) -> OwnLine {
        OwnLine {
            seq,
            name: "me".into(),
            text: format!("line {seq}"),
            sent_at_ms: 1,
            hash: Hex([seq as u8; 32]),
            sig: None,
        }
    }

    #[test]
    fn keeps_identity_lines_and_marks_across_restarts() {
        let dir = temp_dir("keeps");
        let other = Identity::generate().id();
        let (mut s, first, restored) = StateDir::open(&dir).unwrap();
        assert_eq!(restored.my_seq, 0);
        s.said(&line(1)).unwrap();
        s.said(&OwnLine { sig: Some(Hex([9; 64])), ..line(2) }).unwrap();
        s.marks([(other, (7, Hex([7; 32])))].into()).unwrap();
        s.sync().unwrap();
        drop(s);
        let (_s, again, restored) = StateDir::open(&dir).unwrap();
        assert_eq!(again.id(), first.id());
        assert_eq!(restored.my_seq, 2);
        assert_eq!(restored.own, vec![line(1), OwnLine { sig: Some(Hex([9; 64])), ..line(2) }]);
        assert_eq!(restored.marks[&other], (7, Hex([7; 32])));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_nothing_before_it_is_lost() {
        let dir = temp_dir("torn");
        let (mut s, _, _) = StateDir::open(&dir).unwrap();
        s.said(&line(1)).unwrap();
        s.sync().unwrap();
        drop(s);
        let mut f = OpenOptions::new().append(true).open(dir.join("journal")).unwrap();
        f.write_all(br#"{"said":{"seq":2,"te"#).unwrap();
        let (_, _, restored) = StateDir::open(&dir).unwrap();
        assert_eq!(restored.own, vec![line(1)]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_directory_serves_one_peer_at_a_time() {
        let dir = temp_dir("lock");
        let (_held, _, _) = StateDir::open(&dir).unwrap();
        let second = StateDir::open(&dir).map(|_| ()).unwrap_err();
        assert!(second.to_string().contains("in use by another peer"), "{second}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn compaction_keeps_the_state_and_the_floor() {
        let dir = temp_dir("compact");
        let other = Identity::generate().id();
        let (mut s, _, _) = StateDir::open(&dir).unwrap();
        for seq in 1..=100 {
            s.said(&line(seq)).unwrap();
        }
        s.compact(&[line(99), line(100)], (98, Hex([98; 32])), &[(other, (3, Hex([3; 32])))].into()).unwrap();
        s.said(&line(101)).unwrap();
        s.sync().unwrap();
        drop(s);
        let (_, _, restored) = StateDir::open(&dir).unwrap();
        assert_eq!(restored.my_seq, 101);
        assert_eq!(restored.own.len(), 3);
        assert_eq!(restored.floor, Some((98, Hex([98; 32]))));
        assert_eq!(restored.marks[&other], (3, Hex([3; 32])));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_protocol_1_state_directory_is_refused_with_a_reason() {
        let dir = temp_dir("v1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("identity"), br#"{"id":"0123456789abcdef0123456789abcdef"}"#).unwrap();
        let err = StateDir::open(&dir).map(|_| ()).unwrap_err();
        assert!(format!("{err:#}").contains("protocol 1"), "{err:#}");
        fs::remove_dir_all(dir).unwrap();
    }
}
