//! `RelPath`: a path relative to a share root, validated once at construction.
//!
//! The grammar (security.md rule 3): a list of components, each 1..=255 bytes with no `/` and no
//! NUL, none of them `.` or `..`; at most [`MAX_PATH_BYTES`] joined and [`MAX_PATH_DEPTH`] deep;
//! the first component is never the reserved [`RESERVED_NAME`]. Anything else is rejected, never
//! "cleaned". Any other byte is legal (Linux file names are bytes), so names are not `str`:
//! printing goes through [`RelPath::escaped`].
//!
//! The empty path is the share root itself. Paths order bytewise on their `/`-joined form, which
//! puts every directory before everything beneath it, and everything beneath it in one
//! contiguous range (see [`RelPath::is_ancestor_of`]).

use crate::limits::{MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_PATH_DEPTH};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The directory each share root reserves for vmsync itself (marker, staging). Never synced,
/// never scanned as content, and no peer may name it.
pub const RESERVED_NAME: &[u8] = b".vmsync";

/// Whether a name at a share's root is the reserved directory's, in any ASCII case: on a
/// filesystem that folds case (vfat, ext4 `casefold`), `.VMSYNC` opens `.vmsync`.
pub fn is_reserved(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(RESERVED_NAME)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path component")]
    EmptyComponent,
    #[error("path component `.` or `..`")]
    DotComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path component longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("path longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("path deeper than {MAX_PATH_DEPTH} components")]
    TooDeep,
    #[error("path names the reserved `.vmsync` directory")]
    Reserved,
    #[error("absolute path")]
    Absolute,
}

/// A validated path relative to a share root. See the module docs for the grammar.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelPath(Box<[u8]>);

impl RelPath {
    /// The share root itself.
    pub fn root() -> Self {
        RelPath(Box::default())
    }

    /// Parses a `/`-joined path. A leading `/`, `//`, a trailing `/` and `.`/`..` are errors.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PathError> {
        if bytes.is_empty() {
            return Ok(Self::root());
        }
        if bytes.len() > MAX_PATH_BYTES {
            return Err(PathError::PathTooLong);
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute);
        }
        let mut depth = 0usize;
        for (i, comp) in bytes.split(|&b| b == b'/').enumerate() {
            validate_name(comp)?;
            if i == 0 && is_reserved(comp) {
                return Err(PathError::Reserved);
            }
            depth += 1;
        }
        if depth > MAX_PATH_DEPTH {
            return Err(PathError::TooDeep);
        }
        Ok(RelPath(bytes.into()))
    }

    /// Builds a path from components, validating each.
    pub fn from_components<I, C>(components: I) -> Result<Self, PathError>
    where
        I: IntoIterator<Item = C>,
        C: AsRef<[u8]>,
    {
        let mut joined = Vec::new();
        for (i, c) in components.into_iter().enumerate() {
            if i > 0 {
                joined.push(b'/');
            }
            let c = c.as_ref();
            if c.is_empty() {
                return Err(PathError::EmptyComponent);
            }
            joined.extend_from_slice(c);
            if joined.len() > MAX_PATH_BYTES {
                return Err(PathError::PathTooLong);
            }
        }
        Self::from_bytes(&joined)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The `/`-joined bytes; empty for the root.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        let bytes: &[u8] = &self.0;
        bytes.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.iter().filter(|&&b| b == b'/').count() + 1
        }
    }

    /// The last component; `None` for the root.
    pub fn name(&self) -> Option<&[u8]> {
        if self.is_root() {
            return None;
        }
        let start = self.0.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        self.0.get(start..)
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some(RelPath(self.0[..i].into())),
            None => Some(Self::root()),
        }
    }

    /// Every proper ancestor, nearest first, ending with the root.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> {
        std::iter::successors(self.parent(), |p| p.parent())
    }

    /// `self/name`, validating `name`.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        validate_name(name)?;
        if self.is_root() {
            if is_reserved(name) {
                return Err(PathError::Reserved);
            }
            return Ok(RelPath(name.into()));
        }
        let len = self.0.len() + 1 + name.len();
        if len > MAX_PATH_BYTES {
            return Err(PathError::PathTooLong);
        }
        if self.depth() + 1 > MAX_PATH_DEPTH {
            return Err(PathError::TooDeep);
        }
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        Ok(RelPath(v.into()))
    }

    /// True if `other` is strictly beneath `self`. The root is an ancestor of every other path.
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        if self.is_root() {
            return !other.is_root();
        }
        other.0.len() > self.0.len()
            && other.0.starts_with(&self.0)
            && other.0.get(self.0.len()) == Some(&b'/')
    }

    /// A printable form: printable ASCII as is (with `\` doubled), everything else as `\xNN`.
    /// Safe to put in logs, terminals and JSON: no control characters survive.
    pub fn escaped(&self) -> String {
        escape_bytes(&self.0)
    }
}

/// Escapes arbitrary bytes for display: printable ASCII stays, `\` becomes `\\`, every other
/// byte becomes `\xNN`. Used for every peer-derived string that reaches a log or a terminal.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                s.push_str("\\x");
                s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
                s.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
            }
        }
    }
    s
}

fn validate_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::EmptyComponent);
    }
    if name == b"." || name == b".." {
        return Err(PathError::DotComponent);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(PathError::NameTooLong);
    }
    if name.contains(&0) {
        return Err(PathError::Nul);
    }
    if name.contains(&b'/') {
        return Err(PathError::EmptyComponent);
    }
    Ok(())
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&self.escaped())
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

// On the wire a path is its joined bytes; deserialising validates, so an invalid path can never
// exist as a `RelPath`.
impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RelPath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a relative path as bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<RelPath, E> {
                if v.len() > MAX_PATH_BYTES {
                    return Err(E::custom(PathError::PathTooLong));
                }
                RelPath::from_bytes(v).map_err(E::custom)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// `path` and everything beneath it in a map keyed by path, in order, found by range rather
/// than by looking at every key: descendants are exactly the paths starting with "path/", all
/// sorting between `path` and "path0" ('/' sorts right before '0'); the range also holds
/// siblings like "path-x", which are skipped.
pub fn subtree<'a, V>(
    map: &'a std::collections::BTreeMap<RelPath, V>,
    path: &'a RelPath,
) -> Box<dyn Iterator<Item = (&'a RelPath, &'a V)> + 'a> {
    if path.is_root() {
        return Box::new(map.iter());
    }
    let mut upper = path.0.to_vec();
    upper.push(b'0');
    let hi = RelPath(upper.into_boxed_slice());
    Box::new(
        map.range(path.clone()..hi)
            .filter(move |(p, _)| *p == path || path.is_ancestor_of(p)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &[u8]) -> RelPath {
        RelPath::from_bytes(s).unwrap()
    }

    #[test]
    fn rejects_hostile_paths() {
        let cases: &[(&[u8], PathError)] = &[
            (b"/etc/x", PathError::Absolute),
            (b"../x", PathError::DotComponent),
            (b"a/../../x", PathError::DotComponent),
            (b"a/./b", PathError::DotComponent),
            (b"a//b", PathError::EmptyComponent),
            (b"a/", PathError::EmptyComponent),
            (b".", PathError::DotComponent),
            (b"..", PathError::DotComponent),
            (b"a\0b", PathError::Nul),
            (b".vmsync", PathError::Reserved),
            (b".vmsync/tmp/x", PathError::Reserved),
            // A case-folding filesystem opens `.vmsync` for these.
            (b".VMSYNC/x", PathError::Reserved),
            (b".VmSync", PathError::Reserved),
        ];
        for (input, want) in cases {
            assert_eq!(RelPath::from_bytes(input).unwrap_err(), *want, "{input:?}");
        }
        assert_eq!(
            RelPath::from_bytes(&[b'a'; 256]).unwrap_err(),
            PathError::NameTooLong
        );
        let long: Vec<u8> = std::iter::repeat_n(b"abcdefg/".as_slice(), 600)
            .flatten()
            .copied()
            .collect();
        assert_eq!(
            RelPath::from_bytes(&long).unwrap_err(),
            PathError::PathTooLong
        );
        let deep: Vec<u8> = std::iter::repeat_n(b"a/".as_slice(), 1100)
            .flatten()
            .copied()
            .chain(*b"a")
            .collect();
        assert!(deep.len() <= MAX_PATH_BYTES);
        assert_eq!(RelPath::from_bytes(&deep).unwrap_err(), PathError::TooDeep);
    }

    #[test]
    fn accepts_odd_but_legal_names() {
        for name in [
            &b"new\nline"[..],
            b"back\\slash",
            b"\x1b[31mred",
            b"\xff\xfe",
            b"sub/.vmsync",
            b"...",
            b".vmsync2",
        ] {
            let path = p(name);
            assert_eq!(path.as_bytes(), name);
            assert!(!path.escaped().chars().any(|c| c.is_control()));
        }
        assert_eq!(p(b"a\nb\\c\xff").escaped(), "a\\x0ab\\\\c\\xff");
    }

    #[test]
    fn structure() {
        let x = p(b"a/b/c");
        assert_eq!(x.depth(), 3);
        assert_eq!(x.name(), Some(&b"c"[..]));
        assert_eq!(x.parent(), Some(p(b"a/b")));
        let anc: Vec<_> = x.ancestors().collect();
        assert_eq!(anc, vec![p(b"a/b"), p(b"a"), RelPath::root()]);
        assert!(p(b"a").is_ancestor_of(&x));
        assert!(!p(b"a/b/c").is_ancestor_of(&x));
        assert!(!p(b"a/b/c").is_ancestor_of(&p(b"a/b/cd")));
        assert!(RelPath::root().is_ancestor_of(&x));
        assert_eq!(p(b"a/b").join(b"c").unwrap(), x);
        assert_eq!(RelPath::root().join(b".vmsync"), Err(PathError::Reserved));
        assert_eq!(RelPath::root().join(b".VMSync"), Err(PathError::Reserved));
        assert!(RelPath::from_bytes(b".vmsyncx").is_ok());
        assert!(RelPath::from_bytes(b"a/.VMSYNC").is_ok());
        assert!(p(b"a").join(b".vmsync").is_ok());
        assert_eq!(
            RelPath::from_components([&b"a"[..], b"b"]).unwrap(),
            p(b"a/b")
        );
    }

    #[test]
    fn parents_sort_before_children() {
        let mut v = [p(b"a/b"), p(b"a-b"), p(b"a"), p(b"a/b/c"), p(b"b")];
        v.sort();
        let pos = |x: &[u8]| v.iter().position(|q| q.as_bytes() == x).unwrap();
        assert!(pos(b"a") < pos(b"a/b"));
        assert!(pos(b"a/b") < pos(b"a/b/c"));
    }

    #[test]
    fn serde_validates() {
        let bytes = postcard_like_roundtrip(&p(b"x/y"));
        assert_eq!(bytes, p(b"x/y"));
    }

    // serde_json would need UTF-8; a tiny hand check through the serde data model instead.
    fn postcard_like_roundtrip(path: &RelPath) -> RelPath {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::BytesDeserializer<'_, serde::de::value::Error> =
            path.as_bytes().into_deserializer();
        RelPath::deserialize(de).unwrap()
    }

    proptest::proptest! {
        /// The range lookup finds what a look at every entry finds: the path and everything
        /// beneath it, nothing else (names chosen to sort around '/').
        #[test]
        fn subtree_is_the_path_and_its_descendants(
            names in proptest::collection::btree_set("[ab/.0-]{1,6}", 0..40),
            probe in "[ab.0-]{1,3}(/[ab.0-]{1,2})?",
        ) {
            let snap: std::collections::BTreeMap<RelPath, ()> = names
                .iter()
                .filter_map(|n| RelPath::from_bytes(n.as_bytes()).ok())
                .map(|p| (p, ()))
                .collect();
            let Ok(path) = RelPath::from_bytes(probe.as_bytes()) else { return Ok(()) };
            let fast: Vec<&RelPath> = subtree(&snap, &path).map(|(p, _)| p).collect();
            let slow: Vec<&RelPath> =
                snap.keys().filter(|p| **p == path || path.is_ancestor_of(p)).collect();
            proptest::prop_assert_eq!(fast, slow);
        }
    }
}
