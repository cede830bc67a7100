//! The share's own files in `.vmsync/`: the identity marker (`id`), which tells this root
//! from another, and the generation (`generation`), which tells a root that went back in time.

use super::error::{fail, invalid, Loc};
use super::{open_regular, FsError, FsErrorKind, ShareRoot};
use rustix::fd::AsFd;
use rustix::fs::{self as rfs, Mode};
use std::io::{Read, Write};
use vmsync_core::path::RESERVED_NAME;

/// The identity marker inside [`RESERVED_NAME`].
const MARKER_NAME: &[u8] = b"id";

/// The share generation inside [`RESERVED_NAME`]: decimal digits and a newline.
const GENERATION_NAME: &[u8] = b"generation";

/// Read at most this much of a generation file: `u64::MAX` has 20 digits, then a newline and
/// one byte to spot junk.
const GENERATION_READ_LIMIT: usize = 22;

const MARKER_MODE: u32 = 0o644;

/// Hex digits in the marker file (16 bytes).
const MARKER_HEX_LEN: usize = 32;

/// Read at most this much of a marker file: a valid one, its newline, and one byte to spot junk.
const MARKER_READ_LIMIT: usize = MARKER_HEX_LEN + 2;

impl ShareRoot {
    /// The share's identity marker (`.vmsync/id`, 32 hex digits), or `None` if there is none.
    /// A marker that is not a regular file or not 32 hex digits is an error (the caller must
    /// halt the share, not silently mint a new identity).
    pub fn read_marker(&self) -> Result<Option<[u8; 16]>, FsError> {
        const OP: &str = "read marker";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(MARKER_NAME),
        };
        let (mut file, _) = match open_regular(
            OP,
            self.meta.as_fd(),
            self.dev,
            self.resolver,
            MARKER_NAME,
            loc,
        ) {
            Ok(x) => x,
            Err(e) if e.kind() == FsErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // One byte more than a valid marker with its newline: enough to tell "too long".
        let mut buf = Vec::with_capacity(MARKER_READ_LIMIT);
        (&mut file)
            .take(MARKER_READ_LIMIT as u64)
            .read_to_end(&mut buf)
            .map_err(|e| FsError::Io {
                op: OP,
                path: loc.shown(),
                source: e,
            })?;
        parse_marker(&buf)
            .map(Some)
            .ok_or_else(|| invalid(OP, loc, "the marker is not 32 hex digits"))
    }

    /// Writes the identity marker atomically: temp file, fsync, rename over `.vmsync/id`,
    /// fsync `.vmsync/`. Content: 32 lowercase hex digits and a newline.
    pub fn write_marker(&self, id: [u8; 16]) -> Result<(), FsError> {
        const OP: &str = "write marker";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(MARKER_NAME),
        };
        let temp = self.create_temp()?;
        let result = (|| {
            let mut text = format_marker(&id).into_bytes();
            text.push(b'\n');
            (&temp.file).write_all(&text).map_err(|e| FsError::Io {
                op: OP,
                path: loc.shown(),
                source: e,
            })?;
            rfs::fchmod(&temp.file, Mode::from_raw_mode(MARKER_MODE))
                .map_err(|e| fail(OP, loc, e))?;
            rfs::fsync(&temp.file).map_err(|e| fail(OP, loc, e))?;
            rfs::renameat(&self.tmp, temp.name(), &self.meta, MARKER_NAME)
                .map_err(|e| fail(OP, loc, e))
        })();
        if let Err(e) = result {
            self.discard_temp(temp);
            return Err(e);
        }
        rfs::fsync(&self.meta).map_err(|e| fail(OP, loc, e))
    }

    /// The share generation last written with [`ShareRoot::write_generation`], or `None` if
    /// there is none or it is not a decimal number (a share without a trustworthy generation
    /// is treated as one that went back in time, never as a current one).
    pub fn read_generation(&self) -> Result<Option<u64>, FsError> {
        const OP: &str = "read generation";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(GENERATION_NAME),
        };
        let (mut file, _) = match open_regular(
            OP,
            self.meta.as_fd(),
            self.dev,
            self.resolver,
            GENERATION_NAME,
            loc,
        ) {
            Ok(x) => x,
            Err(e) if e.kind() == FsErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::with_capacity(GENERATION_READ_LIMIT);
        (&mut file)
            .take(GENERATION_READ_LIMIT as u64)
            .read_to_end(&mut buf)
            .map_err(|e| FsError::Io {
                op: OP,
                path: loc.shown(),
                source: e,
            })?;
        Ok(parse_generation(&buf))
    }

    /// Replaces the share generation atomically: temp file, rename over
    /// `.vmsync/generation`. With `durable`, the temp's data is fdatasynced before the rename
    /// and `.vmsync/` fsynced after it; without, a crash of the whole guest may bring back the
    /// previous value (a false alarm, never a missed revert: see `docs/safety.md`).
    pub fn write_generation(&self, generation: u64, durable: bool) -> Result<(), FsError> {
        const OP: &str = "write generation";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(GENERATION_NAME),
        };
        let temp = self.create_temp()?;
        let result = (|| {
            let text = format!("{generation}\n");
            (&temp.file)
                .write_all(text.as_bytes())
                .map_err(|e| FsError::Io {
                    op: OP,
                    path: loc.shown(),
                    source: e,
                })?;
            rfs::fchmod(&temp.file, Mode::from_raw_mode(MARKER_MODE))
                .map_err(|e| fail(OP, loc, e))?;
            if durable {
                rfs::fdatasync(&temp.file).map_err(|e| fail(OP, loc, e))?;
            }
            rfs::renameat(&self.tmp, temp.name(), &self.meta, GENERATION_NAME)
                .map_err(|e| fail(OP, loc, e))
        })();
        if let Err(e) = result {
            self.discard_temp(temp);
            return Err(e);
        }
        if durable {
            rfs::fsync(&self.meta).map_err(|e| fail(OP, loc, e))?;
        }
        Ok(())
    }
}

fn format_marker(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// 1 to 20 decimal digits that fit a `u64`, optionally followed by one newline.
fn parse_generation(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    // Checked up front: `parse` alone would accept a sign (`+7`).
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// 32 hex digits (either case), optionally followed by one newline.
fn parse_marker(bytes: &[u8]) -> Option<[u8; 16]> {
    let hex = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    // Checked up front: `from_str_radix` alone would accept a sign (`+f`).
    if hex.len() != MARKER_HEX_LEN || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut id = [0u8; 16];
    for (out, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).ok()?;
        *out = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vmsync_core::path::escape_bytes;

    #[test]
    fn generation_format() {
        let cases: [(&[u8], Option<u64>); 10] = [
            (b"0\n", Some(0)),
            (b"7", Some(7)),
            (b"18446744073709551615\n", Some(u64::MAX)),
            (b"18446744073709551616\n", None),
            (b"+7\n", None),
            (b"-1\n", None),
            (b"7\n\n", None),
            (b" 7\n", None),
            (b"\n", None),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_generation(text), want, "{}", escape_bytes(text));
        }
    }

    #[test]
    fn generation_round_trips_through_the_reserved_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(dir.path()).unwrap();
        assert_eq!(root.read_generation().unwrap(), None);
        for (generation, durable) in [(1, false), (2, true), (u64::MAX, false)] {
            root.write_generation(generation, durable).unwrap();
            assert_eq!(root.read_generation().unwrap(), Some(generation));
            let text = std::fs::read(dir.path().join(".vmsync/generation")).unwrap();
            assert_eq!(text, format!("{generation}\n").into_bytes());
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join(".vmsync/tmp"))
                .unwrap()
                .count(),
            0
        );
        std::fs::write(dir.path().join(".vmsync/generation"), b"junk\n").unwrap();
        assert_eq!(root.read_generation().unwrap(), None);
    }

    #[test]
    fn marker_format() {
        let id: [u8; 16] = *b"\x00\x01\x7f\x80\xff0123456789a";
        let text = format_marker(&id);
        assert_eq!(text.len(), 32);
        assert_eq!(parse_marker(text.as_bytes()), Some(id));
        assert_eq!(parse_marker(format!("{text}\n").as_bytes()), Some(id));
        assert_eq!(parse_marker(text.to_uppercase().as_bytes()), Some(id));
        assert_eq!(parse_marker(format!("{text}\n\n").as_bytes()), None);
        assert_eq!(parse_marker(&text.as_bytes()[..31]), None);
        assert_eq!(parse_marker(b"zz000000000000000000000000000000"), None);
        assert_eq!(parse_marker(b"+f000000000000000000000000000000"), None);
        assert_eq!(parse_marker(b""), None);
    }
}
