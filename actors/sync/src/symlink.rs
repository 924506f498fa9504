//! Which symlink targets sync accepts (Mutagen's "portable" mode): relative, no `\` or `:`
//! (they mean something else on Windows), and staying inside the root when resolved
//! lexically from the link's own directory. Anything else is a problem: reported, never
//! followed, never propagated. The check is lexical: it does not look at the filesystem, so
//! it runs the same on a snapshot received from a peer.

use serde::{Deserialize, Serialize};

use crate::path::RelPath;

/// Why a symlink's target is not portable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SymlinkError {
    /// The target is empty, which no filesystem accepts.
    #[error("symlink {0} has an empty target")]
    Empty(RelPath),
    /// The target is absolute: it would point elsewhere on the other machine. Make it
    /// relative to the link's directory.
    #[error("symlink {link} has absolute target {target:?}; only relative targets sync")]
    Absolute { link: RelPath, target: String },
    /// The target contains `\`, `:` or NUL, which do not mean the same thing everywhere.
    #[error("symlink {link} target {target:?} contains {ch:?}, which is not portable")]
    NonPortable {
        link: RelPath,
        target: String,
        ch: char,
    },
    /// The target climbs out of the sync root.
    #[error("symlink {link} target {target:?} points outside the sync root")]
    Escapes { link: RelPath, target: String },
}

/// Checks that the symlink at `link` with `target` is portable and stays inside the root.
pub fn check_portable(link: &RelPath, target: &str) -> Result<(), SymlinkError> {
    if target.is_empty() {
        return Err(SymlinkError::Empty(link.clone()));
    }
    if target.starts_with('/') {
        return Err(SymlinkError::Absolute {
            link: link.clone(),
            target: target.to_owned(),
        });
    }
    if let Some(ch) = target.chars().find(|c| matches!(c, '\\' | ':' | '\0')) {
        return Err(SymlinkError::NonPortable {
            link: link.clone(),
            target: target.to_owned(),
            ch,
        });
    }
    // Depth of the directory holding the link; `..` may climb back to the root, not past it.
    let mut depth = link.depth().saturating_sub(1);
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                depth = depth.checked_sub(1).ok_or_else(|| SymlinkError::Escapes {
                    link: link.clone(),
                    target: target.to_owned(),
                })?;
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(link: &str, target: &str, expect: Result<(), &str>) {
        let got = check_portable(&RelPath::parse(link).unwrap(), target);
        match (got, expect) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(msg)) => assert!(
                e.to_string().contains(msg),
                "{link} -> {target}: {e} should contain {msg:?}"
            ),
            (got, want) => panic!("{link} -> {target}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn portable_table() {
        check("l", "a", Ok(()));
        check("l", "./a/b", Ok(()));
        check("d/l", "../a", Ok(()));
        check("d/e/l", "../../x", Ok(()));
        check("d/l", "x/../../y", Ok(()));
        check("d/l", "..", Ok(()));
        check("l", ".", Ok(()));
        check("l", "a//b/", Ok(()));
        check("l", "", Err("empty target"));
        check("l", "/etc/passwd", Err("absolute target \"/etc/passwd\""));
        check("l", "..", Err("outside the sync root"));
        check("d/l", "../..", Err("outside the sync root"));
        check("d/l", "x/../../../y", Err("outside the sync root"));
        check("l", "a/../../b/c", Err("outside the sync root"));
        check("l", "C:foo", Err("contains ':'"));
        check("l", "a\\b", Err("contains '\\\\'"));
    }
}
