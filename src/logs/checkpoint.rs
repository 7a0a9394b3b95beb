//! Checkpoints: how far into each file the sink has acknowledged, kept in a small JSON state
//! file (`logs.checkpoint`) so a restart resumes where the last acknowledged batch ended.
//!
//! The file is rewritten whole after every acknowledged batch: written to `PATH.tmp`, synced,
//! then renamed over `PATH`, so a crash leaves either the old or the new state, never half of
//! one. A file is known by device and inode (a rename keeps both), and its first bytes' hash
//! guards against an inode reused by a new file or content replaced in place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A file's identity: it survives a rename, not a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// The position of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Where it was last seen (for people reading the state file, and logs).
    pub path: PathBuf,
    #[serde(flatten)]
    pub id: FileId,
    /// Bytes acknowledged by the sink: reading resumes here.
    pub offset: u64,
    /// How many of the first bytes `head_hash` covers.
    pub head_len: u64,
    pub head_hash: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    files: Vec<Position>,
}

/// Reads the state file; a missing file is an empty state, a damaged one is reported and
/// treated as empty (files are then read per `start_at`).
pub fn load(path: &Path) -> Result<BTreeMap<FileId, Position>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let state: StateFile = serde_json::from_slice(&text)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    Ok(state.files.into_iter().map(|p| (p.id, p)).collect())
}

/// Replaces the state file atomically (temp file, fsync, rename).
pub fn save(path: &Path, positions: impl Iterator<Item = Position>) -> std::io::Result<()> {
    let state = StateFile {
        version: 1,
        files: positions.collect(),
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// FNV-1a, 64 bits. Written by hand (ten lines): the hash is persisted, so it must not change
/// between Rust releases as std's `DefaultHasher` may.
pub fn head_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(load(&path).unwrap().is_empty());
        let p = Position {
            path: "/var/log/a.log".into(),
            id: FileId { dev: 1, ino: 2 },
            offset: 42,
            head_len: 10,
            head_hash: head_hash(b"0123456789"),
        };
        save(&path, std::iter::once(p.clone())).unwrap();
        assert_eq!(load(&path).unwrap()[&p.id], p);
        assert!(!dir.path().join("state.json.tmp").exists());
        std::fs::write(&path, "{").unwrap();
        assert!(load(&path).is_err());
    }

    #[test]
    fn head_hash_is_fnv1a() {
        assert_eq!(head_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(head_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
