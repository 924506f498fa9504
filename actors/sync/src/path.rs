//! `RelPath`: a path inside a sync root, parsed once at the boundary so the rest of the
//! crate never sees `..`, an absolute path or a NUL byte (parse, don't validate).
//!
//! Paths from a peer arrive through serde, which goes through [`RelPath::parse`] too.
//!
//! Ordering is component-wise (`a` < `a/b` < `a-b`), not byte-wise: every subtree is one
//! contiguous range of a `BTreeMap<RelPath, _>`, parents sort before their children, and
//! iterating in reverse visits children before parents.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest path accepted, in bytes (Linux's `PATH_MAX`). It also bounds the depth of a path,
/// and with it the recursion depth of reconciliation, to `PATH_BYTES_MAX / 2`.
pub const PATH_BYTES_MAX: usize = 4096;

/// Longest single component accepted, in bytes (`NAME_MAX` on Linux and macOS).
pub const NAME_BYTES_MAX: usize = 255;

/// Why a string is not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path starts with `/`. Sync paths are relative to the root: drop the leading `/`.
    #[error("path {0:?} is absolute; sync paths are relative to the root")]
    Absolute(String),
    /// The path has an empty component (`a//b` or a trailing `/`).
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    /// The path has a `.` or `..` component, which could name something outside the root.
    #[error("path {path:?} has a {component:?} component")]
    DotComponent { path: String, component: String },
    /// The path contains a NUL byte, which no filesystem accepts.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// The path is longer than [`PATH_BYTES_MAX`].
    #[error("path of {0} bytes is longer than the {max} byte limit", max = PATH_BYTES_MAX)]
    TooLong(usize),
    /// One component is longer than [`NAME_BYTES_MAX`].
    #[error("component {0:?} is longer than the {max} byte limit", max = NAME_BYTES_MAX)]
    NameTooLong(String),
}

/// A relative, `/`-separated, UTF-8 path inside a sync root. The root is the empty path.
///
/// Shared (`Arc<str>`): snapshots, the ancestor and plans hold the same paths many times,
/// and cloning a tree of a million entries must not mean a million allocations.
#[derive(Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct RelPath(Arc<str>);

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Default for RelPath {
    fn default() -> Self {
        Self::root()
    }
}

impl RelPath {
    /// The root of the sync tree (the empty path).
    pub fn root() -> Self {
        RelPath(Arc::from(""))
    }

    /// Parses `s` as a path inside the root. The empty string is the root.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong(s.len()));
        }
        if s.is_empty() {
            return Ok(Self::root());
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s.to_owned()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_owned()));
        }
        for component in s.split('/') {
            check_name(s, component)?;
        }
        Ok(RelPath(Arc::from(s)))
    }

    /// The path as a string (`""` for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The components, outermost first; none for the root.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.bytes().filter(|&b| b == b'/').count() + 1
        }
    }

    /// The last component, or `None` for the root.
    pub fn name(&self) -> Option<&str> {
        if self.is_root() {
            None
        } else {
            self.0.rsplit('/').next()
        }
    }

    /// The containing directory, or `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => RelPath(Arc::from(&self.0[..i])),
            None => Self::root(),
        })
    }

    /// This path extended by one component `name`.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        let joined = if self.is_root() {
            name.to_owned()
        } else {
            format!("{}/{}", self.0, name)
        };
        if joined.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong(joined.len()));
        }
        if name.contains('\0') {
            return Err(PathError::Nul(joined));
        }
        if name.contains('/') || name.is_empty() {
            return Err(PathError::EmptyComponent(joined));
        }
        check_name(&joined, name)?;
        Ok(RelPath(Arc::from(joined)))
    }

    /// Whether `self` is `other` or lies inside it (the root contains everything).
    pub fn starts_with(&self, other: &RelPath) -> bool {
        if other.is_root() {
            return true;
        }
        match self.0.strip_prefix(other.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The path to the root's directory `root` on the local filesystem.
    pub fn to_fs_path(&self, root: &std::path::Path) -> std::path::PathBuf {
        let mut p = root.to_path_buf();
        for c in self.components() {
            p.push(c);
        }
        p
    }

    /// Every proper ancestor, the root first, ending with the parent.
    pub fn ancestors(&self) -> Vec<RelPath> {
        let mut out = Vec::with_capacity(self.depth());
        let mut cur = self.parent();
        while let Some(p) = cur {
            cur = p.parent();
            out.push(p);
        }
        out.reverse();
        out
    }
}

fn check_name(path: &str, component: &str) -> Result<(), PathError> {
    match component {
        "" => Err(PathError::EmptyComponent(path.to_owned())),
        "." | ".." => Err(PathError::DotComponent {
            path: path.to_owned(),
            component: component.to_owned(),
        }),
        c if c.len() > NAME_BYTES_MAX => Err(PathError::NameTooLong(c.to_owned())),
        _ => Ok(()),
    }
}

impl Ord for RelPath {
    /// Component-wise: `/` sorts before every other byte (NUL cannot occur), which is the
    /// same as comparing the lists of components.
    fn cmp(&self, other: &Self) -> Ordering {
        let key = |b: u8| if b == b'/' { 0 } else { b };
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let n = a.len().min(b.len());
        // Equal prefixes compare a word at a time; only the first differing byte is mapped.
        let mut i = 0;
        while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
            i += 8;
        }
        match a[i..n].iter().zip(&b[i..n]).position(|(x, y)| x != y) {
            Some(j) => key(a[i + j]).cmp(&key(b[i + j])),
            None => a.len().cmp(&b.len()),
        }
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        RelPath::parse(&s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0.to_string()
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("<root>")
        } else {
            f.write_str(&self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: Result<&str, &str>) {
        let got = RelPath::parse(input);
        match (got, expect) {
            (Ok(p), Ok(s)) => assert_eq!(p.as_str(), s, "input {input:?}"),
            (Err(e), Err(msg)) => assert!(
                e.to_string().contains(msg),
                "input {input:?}: error {e} should contain {msg:?}"
            ),
            (got, expect) => panic!("input {input:?}: got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn parse_table() {
        let long = "a/".repeat(PATH_BYTES_MAX);
        let long_name = "n".repeat(NAME_BYTES_MAX + 1);
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("", Ok("")),
            ("a", Ok("a")),
            ("a/b/c.txt", Ok("a/b/c.txt")),
            ("dir with space/ü", Ok("dir with space/ü")),
            (".hidden/..x/x..", Ok(".hidden/..x/x..")),
            ("/etc/passwd", Err("\"/etc/passwd\" is absolute")),
            ("a//b", Err("\"a//b\" has an empty component")),
            ("a/", Err("empty component")),
            ("./a", Err("\".\" component")),
            ("a/../../b", Err("\"..\" component")),
            ("..", Err("\"..\" component")),
            ("a\0b", Err("NUL")),
            (&long, Err("longer than the 4096 byte limit")),
            (&long_name, Err("component")),
        ];
        for (input, expect) in cases {
            check(input, *expect);
        }
    }

    #[test]
    fn order_keeps_subtrees_contiguous() {
        let mut v: Vec<RelPath> = ["a-b", "a/b", "a", "", "a/b/c", "b", "a.b", "a/c"]
            .iter()
            .map(|s| RelPath::parse(s).unwrap())
            .collect();
        v.sort();
        let got: Vec<&str> = v.iter().map(|p| p.as_str()).collect();
        assert_eq!(got, ["", "a", "a/b", "a/b/c", "a/c", "a-b", "a.b", "b"]);
    }

    /// The word-at-a-time comparison is the comparison of component lists.
    #[test]
    fn order_is_component_order() {
        use proptest::prelude::*;
        let path = || {
            let name = proptest::string::string_regex("[a-c.-]{1,11}").unwrap();
            proptest::collection::vec(name, 0..4)
        };
        proptest!(|(a in path(), b in path())| {
            let ok = |v: &Vec<String>| v.iter().all(|c| c != "." && c != "..");
            prop_assume!(ok(&a) && ok(&b));
            let (pa, pb) = (RelPath::parse(&a.join("/")).unwrap(), RelPath::parse(&b.join("/")).unwrap());
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
        });
    }

    #[test]
    fn navigation() {
        let p = RelPath::parse("a/b/c").unwrap();
        assert_eq!(p.name(), Some("c"));
        assert_eq!(p.depth(), 3);
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(RelPath::parse("a").unwrap().parent(), Some(RelPath::root()));
        assert_eq!(RelPath::root().parent(), None);
        let anc: Vec<String> = p
            .ancestors()
            .iter()
            .map(|a| a.as_str().to_owned())
            .collect();
        assert_eq!(anc, ["", "a", "a/b"]);
        assert!(p.starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(p.starts_with(&RelPath::root()));
        assert!(!RelPath::parse("a/bc")
            .unwrap()
            .starts_with(&RelPath::parse("a/b").unwrap()));
        assert_eq!(RelPath::root().join("x").unwrap().as_str(), "x");
        assert_eq!(p.join("d").unwrap().as_str(), "a/b/c/d");
        assert!(p.join("..").is_err());
        assert!(p.join("x/y").is_err());
    }

    #[test]
    fn serde_rejects_bad_paths() {
        let ok: RelPath = serde_json::from_str("\"a/b\"").unwrap();
        assert_eq!(ok.as_str(), "a/b");
        let err = serde_json::from_str::<RelPath>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("\"..\" component"), "{err}");
    }
}
