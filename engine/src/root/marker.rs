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
        // One byte more than a valid marker with its newline: enough to tell "too long".
        let Some(buf) = self.read_reserved(OP, MARKER_NAME, MARKER_READ_LIMIT)? else {
            return Ok(None);
        };
        parse_marker(&buf).map(Some).ok_or_else(|| {
            invalid(
                OP,
                reserved_loc(MARKER_NAME),
                "the marker is not 32 hex digits",
            )
        })
    }

    /// Writes the identity marker atomically: temp file, fsync, rename over `.vmsync/id`,
    /// fsync `.vmsync/`. Content: 32 lowercase hex digits and a newline.
    pub fn write_marker(&self, id: [u8; 16]) -> Result<(), FsError> {
        let mut text = format_marker(&id).into_bytes();
        text.push(b'\n');
        self.write_reserved("write marker", MARKER_NAME, &text, Sync::All)
    }

    /// The share generation last written with [`ShareRoot::write_generation`], or `None` if
    /// there is none or it is not a decimal number (a share without a trustworthy generation
    /// is treated as one that went back in time, never as a current one).
    pub fn read_generation(&self) -> Result<Option<u64>, FsError> {
        let buf = self.read_reserved("read generation", GENERATION_NAME, GENERATION_READ_LIMIT)?;
        Ok(buf.as_deref().and_then(parse_generation))
    }

    /// Replaces the share generation atomically: temp file, rename over
    /// `.vmsync/generation`. With `durable`, the temp's data is fdatasynced before the rename
    /// and `.vmsync/` fsynced after it; without, a crash of the whole guest may bring back the
    /// previous value (a false alarm, never a missed revert: see `docs/safety.md`).
    pub fn write_generation(&self, generation: u64, durable: bool) -> Result<(), FsError> {
        let text = format!("{generation}\n");
        let sync = if durable { Sync::Data } else { Sync::None };
        self.write_reserved("write generation", GENERATION_NAME, text.as_bytes(), sync)
    }

    /// At most `limit` bytes of the regular file `name` in `.vmsync/`; `None` if it is absent.
    fn read_reserved(
        &self,
        op: &'static str,
        name: &'static [u8],
        limit: usize,
    ) -> Result<Option<Vec<u8>>, FsError> {
        let loc = reserved_loc(name);
        let (file, _) =
            match open_regular(op, self.meta.as_fd(), self.dev, self.resolver, name, loc) {
                Ok(x) => x,
                Err(e) if e.kind() == FsErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
        let mut buf = Vec::with_capacity(limit);
        file.take(limit as u64)
            .read_to_end(&mut buf)
            .map_err(|e| FsError::Io {
                op,
                path: loc.shown(),
                source: e,
            })?;
        Ok(Some(buf))
    }

    /// Replaces `name` in `.vmsync/` with `content` (mode [`MARKER_MODE`]) atomically: a temp
    /// file renamed over it, synced as `sync` says (and `.vmsync/` fsynced after the rename
    /// unless `Sync::None`).
    fn write_reserved(
        &self,
        op: &'static str,
        name: &'static [u8],
        content: &[u8],
        sync: Sync,
    ) -> Result<(), FsError> {
        let loc = reserved_loc(name);
        let temp = self.create_temp()?;
        let result = (|| {
            (&temp.file).write_all(content).map_err(|e| FsError::Io {
                op,
                path: loc.shown(),
                source: e,
            })?;
            rfs::fchmod(&temp.file, Mode::from_raw_mode(MARKER_MODE))
                .map_err(|e| fail(op, loc, e))?;
            match sync {
                Sync::All => rfs::fsync(&temp.file).map_err(|e| fail(op, loc, e))?,
                Sync::Data => rfs::fdatasync(&temp.file).map_err(|e| fail(op, loc, e))?,
                Sync::None => {}
            }
            rfs::renameat(&self.tmp, temp.name(), &self.meta, name).map_err(|e| fail(op, loc, e))
        })();
        if let Err(e) = result {
            self.discard_temp(temp);
            return Err(e);
        }
        if sync != Sync::None {
            rfs::fsync(&self.meta).map_err(|e| fail(op, loc, e))?;
        }
        Ok(())
    }
}

/// How a file in `.vmsync/` is synced before its rename.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// Not at all (nor the directory after).
    None,
    /// Its data (`fdatasync`).
    Data,
    /// Data and metadata (`fsync`).
    All,
}

fn reserved_loc(name: &'static [u8]) -> Loc<'static> {
    Loc {
        base: RESERVED_NAME,
        name: Some(name),
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
