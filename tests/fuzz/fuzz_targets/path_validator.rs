//! The path validator: `RelPath::from_bytes` never panics; an accepted path gives back exactly its
//! input, rebuilds from its components, and decodes identically from the wire.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync_core::RelPath;

fuzz_target!(|data: &[u8]| {
    let parsed = RelPath::from_bytes(data);
    if let Ok(path) = &parsed {
        assert_eq!(path.as_bytes(), data);
        let rebuilt = RelPath::from_components(path.components()).expect("components rebuild");
        assert_eq!(&rebuilt, path);
        assert!(!path.escaped().chars().any(char::is_control));
    }
    // The wire form (postcard byte string) validates exactly like `from_bytes`.
    let wire = postcard::to_allocvec(&serde_bytes_like(data)).expect("bytes encode");
    let decoded = postcard::from_bytes::<RelPath>(&wire);
    assert_eq!(decoded.is_ok(), parsed.is_ok());
    if let (Ok(a), Ok(b)) = (decoded, parsed) {
        assert_eq!(a, b);
    }
});

/// A byte string as postcard writes one: length, then the bytes.
struct Bytes<'a>(&'a [u8]);

impl serde::Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

fn serde_bytes_like(data: &[u8]) -> Bytes<'_> {
    Bytes(data)
}
