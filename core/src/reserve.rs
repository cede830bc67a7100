//! The free-space reserve (`min_free`): how much of a filesystem a share leaves free. A
//! destination below its reserve refuses to stage or write new content (an
//! [`EndpointError::DiskFull`](crate::endpoint::EndpointError::DiskFull)) instead of filling the
//! disk; see `docs/safety.md`, "Faults and full disks".
//!
//! Pure: the caller measures the filesystem (`fstatvfs`) and passes its figures in.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The default reserve's fixed part: 1 GiB...
pub const DEFAULT_MIN_FREE_BYTES: u64 = 1 << 30;
/// ...or this share of the filesystem, in percent, whichever is smaller (a 10 GiB disk keeps
/// 512 MiB free, not a tenth of itself).
pub const DEFAULT_MIN_FREE_PERCENT: u64 = 5;

/// How much room a share leaves free on its filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MinFree {
    /// The smaller of [`DEFAULT_MIN_FREE_BYTES`] and [`DEFAULT_MIN_FREE_PERCENT`] % of the
    /// filesystem.
    #[default]
    Default,
    /// A fixed number of bytes (0: no reserve).
    Bytes(u64),
    /// Hundredths of a percent of the filesystem's size (`"5%"` is 500), at most 10,000.
    Basis(u32),
}

/// Hundredths of a percent in a whole filesystem.
const BASIS_WHOLE: u32 = 10_000;

impl MinFree {
    /// Parses a config value: a size with an optional binary unit (`"1GiB"`, `"512 MiB"`,
    /// `"4096"`, units `B`, `KiB`, `MiB`, `GiB`, `TiB`) or a percentage of the filesystem
    /// (`"5%"`, `"2.5%"`, at most two decimals, at most 100).
    pub fn parse(text: &str) -> Result<MinFree, String> {
        let t = text.trim();
        if let Some(pct) = t.strip_suffix('%') {
            return parse_percent(pct.trim())
                .map(MinFree::Basis)
                .ok_or_else(|| format!("`{text}` is not a percentage from 0% to 100%"));
        }
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        let shift = match unit.trim() {
            "" | "B" => 0,
            "KiB" => 10,
            "MiB" => 20,
            "GiB" => 30,
            "TiB" => 40,
            _ => {
                return Err(format!(
                    "`{text}`: expected a size such as \"1GiB\" (B, KiB, MiB, GiB, TiB) or a \
                     percentage such as \"5%\""
                ))
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{text}`: the size needs a whole number"))?;
        n.checked_mul(1u64 << shift)
            .map(MinFree::Bytes)
            .ok_or_else(|| format!("`{text}` is too large"))
    }

    /// The bytes to keep free on a filesystem of `total_bytes`.
    pub fn reserve_bytes(&self, total_bytes: u64) -> u64 {
        match *self {
            MinFree::Default => DEFAULT_MIN_FREE_BYTES.min(percent_of(
                total_bytes,
                u32::try_from(DEFAULT_MIN_FREE_PERCENT * 100).unwrap_or(BASIS_WHOLE),
            )),
            MinFree::Bytes(n) => n,
            MinFree::Basis(b) => percent_of(total_bytes, b.min(BASIS_WHOLE)),
        }
    }

    /// `Some(reserve)` when `free_bytes` (what an unprivileged writer may still use) is below
    /// the reserve of a filesystem of `total_bytes`; `None` when there is room.
    pub fn shortfall(&self, free_bytes: u64, total_bytes: u64) -> Option<u64> {
        let reserve = self.reserve_bytes(total_bytes);
        (free_bytes < reserve).then_some(reserve)
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MinFree::Default => write!(
                f,
                "the smaller of {} and {DEFAULT_MIN_FREE_PERCENT}%",
                ShowBytes(DEFAULT_MIN_FREE_BYTES)
            ),
            MinFree::Bytes(n) => write!(f, "{}", ShowBytes(n)),
            MinFree::Basis(b) => write!(f, "{}.{:02}%", b / 100, b % 100),
        }
    }
}

fn percent_of(total: u64, basis: u32) -> u64 {
    let v = u128::from(total) * u128::from(basis) / u128::from(BASIS_WHOLE);
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn parse_percent(s: &str) -> Option<u32> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || frac.len() > 2 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let frac: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().ok()?
    };
    let basis = whole.checked_mul(100)?.checked_add(frac)?;
    (basis <= BASIS_WHOLE).then_some(basis)
}

/// A byte count for people: `1.5 GiB`, `512 MiB`, `100 B`.
#[derive(Debug, Clone, Copy)]
pub struct ShowBytes(pub u64);

impl fmt::Display for ShowBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        let mut scale = 1u64;
        while unit + 1 < UNITS.len() && self.0 >= scale << 10 {
            scale <<= 10;
            unit += 1;
        }
        let name = UNITS.get(unit).copied().unwrap_or("B");
        if unit == 0 {
            return write!(f, "{} B", self.0);
        }
        // One decimal, truncated, and none when it is zero.
        let tenths = u128::from(self.0) * 10 / u128::from(scale);
        if tenths % 10 == 0 {
            write!(f, "{} {name}", tenths / 10)
        } else {
            write!(f, "{}.{} {name}", tenths / 10, tenths % 10)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<MinFree, ()>)] = &[
            ("1GiB", Ok(MinFree::Bytes(GIB))),
            ("512 MiB", Ok(MinFree::Bytes(512 << 20))),
            ("4096", Ok(MinFree::Bytes(4096))),
            ("0", Ok(MinFree::Bytes(0))),
            ("7B", Ok(MinFree::Bytes(7))),
            ("2TiB", Ok(MinFree::Bytes(2 << 40))),
            ("5%", Ok(MinFree::Basis(500))),
            ("2.5%", Ok(MinFree::Basis(250))),
            ("0.05%", Ok(MinFree::Basis(5))),
            ("100%", Ok(MinFree::Basis(10_000))),
            (" 10 % ", Ok(MinFree::Basis(1000))),
            ("101%", Err(())),
            ("-1%", Err(())),
            ("1.234%", Err(())),
            ("%", Err(())),
            ("1GB", Err(())),
            ("1 gib", Err(())),
            ("GiB", Err(())),
            ("", Err(())),
            ("-5", Err(())),
            ("99999999999TiB", Err(())),
        ];
        for (text, want) in cases {
            let got = MinFree::parse(text).map_err(|_| ());
            assert_eq!(&got, want, "parsing {text:?}");
        }
    }

    #[test]
    fn reserve_table() {
        let cases: &[(MinFree, u64, u64)] = &[
            // Default: 5 % of a small disk, 1 GiB of a big one.
            (MinFree::Default, 10 * GIB, GIB / 2),
            (MinFree::Default, 20 * GIB, GIB),
            (MinFree::Default, 1000 * GIB, GIB),
            (MinFree::Default, 0, 0),
            (MinFree::Bytes(123), 10 * GIB, 123),
            (MinFree::Basis(500), 100 * GIB, 5 * GIB),
            (MinFree::Basis(10_000), 7, 7),
            (MinFree::Basis(10_000), u64::MAX, u64::MAX),
        ];
        for (min, total, want) in cases {
            assert_eq!(min.reserve_bytes(*total), *want, "{min:?} of {total}");
        }
    }

    #[test]
    fn shortfall_is_strictly_below_the_reserve() {
        let m = MinFree::Bytes(100);
        assert_eq!(m.shortfall(99, 1000), Some(100));
        assert_eq!(m.shortfall(100, 1000), None);
        assert_eq!(MinFree::Bytes(0).shortfall(0, 1000), None);
    }

    #[test]
    fn shown_sizes() {
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (GIB, "1 GiB"),
            (5 * GIB / 2, "2.5 GiB"),
        ];
        for (n, want) in cases {
            assert_eq!(ShowBytes(*n).to_string(), *want);
        }
        assert_eq!(MinFree::Basis(250).to_string(), "2.50%");
    }
}
