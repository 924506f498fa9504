//! Local state files (a sync session's ancestor, a root's hash cache): a magic line naming
//! the format and its version, then one value in the codec's encoding. Written through a
//! temporary file and a rename, owner-only, and not synced to disk: every such file is a
//! cache of something that can be rebuilt, and a reader treats a torn, foreign or older
//! file as missing.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

/// Loads the value saved at `path` under `magic`. `Ok(None)` when there is no file;
/// `Err` (naming the file) when it is unreadable or not what `magic` says.
pub fn load<T: DeserializeOwned>(path: &Path, magic: &[u8]) -> Result<Option<T>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let body = bytes
        .strip_prefix(magic)
        .ok_or_else(|| format!("{}: not a {} file", path.display(), name(magic)))?;
    cs_protocol::codec::decode_state(body)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Saves `value` at `path` under `magic`, creating the directory.
pub fn save<T: Serialize>(path: &Path, magic: &[u8], value: &T) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot save {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    }
    let mut bytes = magic.to_vec();
    bytes.extend(cs_protocol::codec::encode_state(value).map_err(|e| fail(&e))?);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| fail(&e))
}

fn name(magic: &[u8]) -> String {
    String::from_utf8_lossy(magic).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state");
        assert_eq!(load::<Vec<u32>>(&path, b"x/1\n"), Ok(None));
        save(&path, b"x/1\n", &vec![1u32, 2, 3]).unwrap();
        assert_eq!(load::<Vec<u32>>(&path, b"x/1\n"), Ok(Some(vec![1, 2, 3])));
        let err = load::<Vec<u32>>(&path, b"y/1\n").unwrap_err();
        assert!(err.contains("not a y/1 file"), "{err}");
        std::fs::write(&path, b"x/1\n\xff\xff\xff").unwrap();
        assert!(load::<Vec<u32>>(&path, b"x/1\n").is_err());
    }
}
