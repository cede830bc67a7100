//! The share's trash: where every file or symlink a transition deletes or replaces is kept
//! instead of unlinked (docs/safety.md, "The trash").
//!
//! Layout: `.vmsync/trash/<batch>/<original relative path>`, one batch directory per
//! transition that kept something, named by the UTC time it was opened
//! (`20261206T081644.123456789Z-7`: sortable by time, the counter unique within the process).
//! The file operations themselves are [`ShareRoot`]'s (`trash_remove`, `trash_link`,
//! `restore_kept`, `remove_trash_batch`); this module holds what is decided around them:
//! - the batch names ([`batch_name`], [`parse_batch_name`]) and the set of batches a running
//!   transition still writes into, which the pruner never touches;
//! - retention ([`Retention`]) and the pruning decision ([`plan_prune`]), pure, and the
//!   background [`Pruner`] that applies it off the request path;
//! - listing what is kept ([`list`]) and putting it back ([`restore`], for the CLI;
//!   [`KeptLog`], the in-memory record `Endpoint::put_back` answers from).
//!
//! What it must not do: delete anything outside `.vmsync/trash/`, remove a batch that is
//! still being written, or make a sync wait for pruning.

use crate::root::{FileKind, FsError, FsErrorKind, ShareRoot};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmsync_core::{Entry, RelPath, Timestamp};

/// Default `keep_deleted`: a week.
pub const DEFAULT_KEEP_DELETED_SECS: u64 = 7 * 24 * 3600;
/// Default `keep_deleted_max`: this percentage of the share's size.
pub const DEFAULT_KEEP_DELETED_PERCENT: u32 = 10;
/// A percentage `keep_deleted_max` never limits the trash below this: on a small share, 10 %
/// would be a few bytes, and every version but the newest would go within a minute.
pub const MIN_PERCENT_LIMIT_BYTES: u64 = 64 << 20;
/// How often the pruner walks the whole trash to count it again (what it was not told of:
/// `restore`, a user deleting from it), and applies the retention by age.
pub const MEASURE_EVERY: Duration = Duration::from_secs(600);
/// After a transition kept something, the pruner prunes no sooner than this after its last
/// prune: churn keeps something many times a second.
pub const PRUNE_MIN_GAP: Duration = Duration::from_secs(5);
/// How long `put_back` can reach back: trash moves older than this are forgotten. Three times
/// the deletion window a halt puts back (`vmsync_core::deletions::DELETION_WINDOW_MS`), for
/// the cycle that crosses it; an older move stays in the trash for `restore`.
pub const PUT_BACK_WINDOW: Duration = Duration::from_secs(180);
/// At most this many trash moves are remembered for `put_back` (about 200 bytes each).
pub const MAX_PUT_BACK_RECORDS: usize = 1_000_000;
/// The size limit never removes a batch younger than this: what a wipe or a burst of edits
/// just kept must outlive any halt, `put_back` and a user's first look, however small the
/// share (10 % of a share of small files is a few kilobytes). The age limit still applies.
pub const SIZE_PRUNE_MIN_AGE: Duration = Duration::from_secs(3600);
/// Thinning (see [`plan_thin`]) waits this many times as long as its last walk took before it
/// walks again: at most about 1/50 of a core, however large the trash.
pub const THIN_COST_SHARE: u32 = 50;

const SECS_PER_DAY: i64 = 86_400;
/// How far the pruner's estimate of when a batch was made may drift from its directory's
/// mtime before the pruner writes the estimate there for the next run ([`TrashUsage`]).
const STAMP_SLACK: Duration = Duration::from_secs(60);

static BATCH_COUNTER: AtomicU64 = AtomicU64::new(0);
static OPEN_BATCHES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Now, as a wall-clock timestamp.
pub fn now() -> Timestamp {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => Timestamp::new(
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(_) => Timestamp::default(),
    }
}

/// A new batch name for the time now, unique within this process.
pub(crate) fn new_batch_name() -> String {
    batch_name(now(), BATCH_COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn register_open(name: &str) {
    if let Ok(mut open) = OPEN_BATCHES.lock() {
        open.insert(name.to_string());
    }
}

pub(crate) fn unregister_open(name: &str) {
    if let Ok(mut open) = OPEN_BATCHES.lock() {
        open.remove(name);
    }
}

fn is_open(name: &str) -> bool {
    OPEN_BATCHES.lock().map_or(true, |open| open.contains(name))
}

/// `YYYYMMDDTHHMMSS.nnnnnnnnnZ-<n>` (UTC). Parsed back by [`parse_batch_name`].
pub fn batch_name(t: Timestamp, n: u64) -> String {
    let days = t.secs.div_euclid(SECS_PER_DAY);
    let rem = t.secs.rem_euclid(SECS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:09}Z-{n}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        t.nanos
    )
}

/// The time and counter of a batch name made by [`batch_name`]; `None` for anything else.
pub fn parse_batch_name(name: &[u8]) -> Option<(Timestamp, u64)> {
    let s = std::str::from_utf8(name).ok()?;
    let (stamp, n) = s.split_once("Z-")?;
    let n: u64 = digits(n)?.parse().ok()?;
    let (date, time) = stamp.split_once('T')?;
    let (hms, nanos) = time.split_once('.')?;
    if date.len() != 8 || hms.len() != 6 || nanos.len() != 9 {
        return None;
    }
    let num = |s: &str| -> Option<i64> { digits(s)?.parse().ok() };
    let (y, m, d) = (num(&date[..4])?, num(&date[4..6])?, num(&date[6..])?);
    let (hh, mm, ss) = (num(&hms[..2])?, num(&hms[2..4])?, num(&hms[4..])?);
    let nanos: u32 = digits(nanos)?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return None;
    }
    let t = Timestamp::new(days * SECS_PER_DAY + hh * 3600 + mm * 60 + ss, nanos);
    // Canonical form only: the name must be exactly what we would have made.
    (batch_name(t, n).as_bytes() == name).then_some((t, n))
}

fn digits(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `2026-12-06T08:16:44.123456789Z`: RFC 3339, UTC, nanoseconds.
pub fn format_rfc3339(t: Timestamp) -> String {
    let days = t.secs.div_euclid(SECS_PER_DAY);
    let rem = t.secs.rem_euclid(SECS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        t.nanos
    )
}

/// A time given on the command line: RFC 3339 UTC (`2026-12-06T08:16:44Z`, fractions
/// allowed) or an age (`10m`, `2h`, `1d`: that long before `now`).
pub fn parse_since(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    if let Ok(age) = parse_duration(s) {
        let secs = i64::try_from(age.as_secs()).map_err(|_| format!("{s:?}: too long ago"))?;
        return Ok(Timestamp::new(now.secs.saturating_sub(secs), now.nanos));
    }
    let bad = || {
        format!(
            "{s:?} is neither an RFC 3339 UTC time (2026-12-06T08:16:44Z) nor an age (10m, 2h, 1d)"
        )
    };
    let body = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = body.split_once('T').ok_or_else(bad)?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let dp: Vec<&str> = date.split('-').collect();
    let tp: Vec<&str> = hms.split(':').collect();
    if dp.len() != 3
        || tp.len() != 3
        || frac.len() > 9
        || (!frac.is_empty() && digits(frac).is_none())
    {
        return Err(bad());
    }
    let num =
        |s: &str| -> Result<i64, String> { digits(s).and_then(|d| d.parse().ok()).ok_or_else(bad) };
    let (y, m, d) = (num(dp[0])?, num(dp[1])?, num(dp[2])?);
    let (hh, mm, ss) = (num(tp[0])?, num(tp[1])?, num(tp[2])?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return Err(bad());
    }
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    };
    Ok(Timestamp::new(
        days * SECS_PER_DAY + hh * 3600 + mm * 60 + ss,
        nanos,
    ))
}

/// `30s`, `10m`, `2h`, `7d`: a number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: a whole number and s, m, h or d (e.g. \"7d\")");
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = digits(&s[..s.len() - unit.len_utf8()])
        .and_then(|d| d.parse().ok())
        .ok_or_else(bad)?;
    let mul = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).map(Duration::from_secs).ok_or_else(bad)
}

/// How much the trash may hold: a share of the side's indexed bytes, or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeLimit {
    /// Percent (0..=100) of the bytes of the files this side indexes.
    Percent(u32),
    Bytes(u64),
}

impl SizeLimit {
    /// `10%`, `5GiB`, `500MB`, `64KiB`, `1000` (bytes).
    pub fn parse(s: &str) -> Result<SizeLimit, String> {
        if let Some(p) = s.strip_suffix('%') {
            let n: u32 = digits(p)
                .and_then(|d| d.parse().ok())
                .filter(|n| *n <= 100)
                .ok_or_else(|| format!("{s:?}: a percentage is a whole number from 0 to 100"))?;
            return Ok(SizeLimit::Percent(n));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let bad = || format!("{s:?} is not a size: e.g. \"10%\", \"5GiB\", \"500MB\"");
        let n: u64 = digits(num).and_then(|d| d.parse().ok()).ok_or_else(bad)?;
        let mul: u64 = match unit {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(mul).map(SizeLimit::Bytes).ok_or_else(bad)
    }

    /// The limit in bytes for a share of `share_bytes` (a percentage: at least
    /// [`MIN_PERCENT_LIMIT_BYTES`]).
    pub fn bytes(self, share_bytes: u64) -> u64 {
        match self {
            SizeLimit::Bytes(b) => b,
            SizeLimit::Percent(p) => u64::try_from(u128::from(share_bytes) * u128::from(p) / 100)
                .unwrap_or(u64::MAX)
                .max(MIN_PERCENT_LIMIT_BYTES),
        }
    }
}

/// A share's `keep_deleted` and `keep_deleted_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_size: SizeLimit,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(DEFAULT_KEEP_DELETED_SECS),
            max_size: SizeLimit::Percent(DEFAULT_KEEP_DELETED_PERCENT),
        }
    }
}

/// One batch as the pruner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchUsage {
    pub id: BatchId,
    pub time: Timestamp,
    pub bytes: u64,
    /// A running transition still writes into it.
    pub open: bool,
}

/// Which batches to remove (indices into `batches`, sorted oldest first): every batch older
/// than `max_age`, then the oldest until the rest hold at most `max_bytes`. Never an open
/// batch, and for size alone never the newest batch nor one younger than
/// [`SIZE_PRUNE_MIN_AGE`]: a large deletion stays recoverable until it ages out.
pub fn plan_prune(
    batches: &[BatchUsage],
    now: Timestamp,
    max_age: Duration,
    max_bytes: u64,
) -> Vec<usize> {
    let cutoff = now
        .secs
        .saturating_sub(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX));
    let newest = batches.len().checked_sub(1);
    let young = Timestamp::new(
        now.secs
            .saturating_sub(i64::try_from(SIZE_PRUNE_MIN_AGE.as_secs()).unwrap_or(i64::MAX)),
        now.nanos,
    );
    let mut remove = Vec::new();
    let mut total: u64 = batches.iter().map(|b| b.bytes).sum();
    for (i, b) in batches.iter().enumerate() {
        if b.open {
            continue;
        }
        let expired = Timestamp::new(cutoff, now.nanos) > b.time;
        let over = total > max_bytes && Some(i) != newest && b.time < young;
        if expired || over {
            remove.push(i);
            total -= b.bytes;
        }
    }
    remove
}

/// One kept file or symlink as thinning sees it: its batch (an index into batches sorted
/// oldest first), its path and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptVersion {
    pub batch: usize,
    pub path: RelPath,
    pub bytes: u64,
}

/// Each kept path's oldest and newest batch (indices into batches sorted oldest first), which
/// is all thinning needs to know of the trash: a version in any other batch is a middle one.
/// A path is keyed by 128 bits of its BLAKE3 hash, so a trash of a million kept versions costs
/// tens of bytes per distinct path here, not a copy of every path.
#[derive(Debug, Default)]
pub struct ThinEnds {
    ends: HashMap<u128, (u32, u32)>,
}

impl ThinEnds {
    fn key(path: &RelPath) -> u128 {
        let hash = blake3::hash(path.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&hash.as_bytes()[..16]);
        u128::from_le_bytes(key)
    }

    /// A version of `path` is kept in `batch`; batches are seen oldest first.
    pub fn see(&mut self, batch: u32, path: &RelPath) {
        self.ends
            .entry(Self::key(path))
            .and_modify(|(_, last)| *last = batch)
            .or_insert((batch, batch));
    }

    /// Whether the version of `path` in `batch` is neither its oldest nor its newest.
    pub fn is_middle(&self, batch: u32, path: &RelPath) -> bool {
        self.ends
            .get(&Self::key(path))
            .is_some_and(|&(first, last)| batch != first && batch != last)
    }
}

/// Which kept versions to remove (indices into `versions`, sorted oldest batch first, a path
/// at most once per batch) when the trash holds `total` bytes, over `max_bytes`, and what is
/// over is too young for the size limit to remove whole batches ([`SIZE_PRUNE_MIN_AGE`]): of
/// each path's versions, all but its oldest and its newest ([`ThinEnds`]), oldest first, until
/// the trash holds at most `max_bytes`. What a wipe removed (each path's newest version) and
/// what a path was before a burst of edits (its oldest) stay; a file rewritten all hour long
/// costs the trash two versions, not one per rewrite. [`TrashUsage`] applies the same rule
/// while walking the trash, without listing it.
pub fn plan_thin(versions: &[KeptVersion], total: u64, max_bytes: u64) -> Vec<usize> {
    let batch = |v: &KeptVersion| u32::try_from(v.batch).unwrap_or(u32::MAX);
    let mut ends = ThinEnds::default();
    for v in versions {
        ends.see(batch(v), &v.path);
    }
    let mut total = total;
    let mut remove = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        if total <= max_bytes {
            break;
        }
        if ends.is_middle(batch(v), &v.path) {
            remove.push(i);
            total = total.saturating_sub(v.bytes);
        }
    }
    remove
}

/// One kept file or symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptItem {
    pub batch: String,
    /// When it was trashed (its batch's time).
    pub time: Timestamp,
    pub path: RelPath,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: Timestamp,
}

/// What is in the trash, by batch: batches with a name we did not make are left out.
/// Sorted by time, then path.
pub fn list(root: &ShareRoot) -> Result<Vec<KeptItem>, FsError> {
    let mut names = root.trash_batches()?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let Some((time, _)) = parse_batch_name(&name) else {
            continue;
        };
        let batch = String::from_utf8_lossy(&name).into_owned();
        walk_batch(root, &name, &mut |path, stat| {
            out.push(KeptItem {
                batch: batch.clone(),
                time,
                path,
                kind: stat.kind,
                size: stat.size,
                mtime: stat.mtime,
            });
        })?;
    }
    Ok(out)
}

/// Calls `f` for every file and symlink of the batch `name`, with its path in the batch.
/// `Ok(false)` when the batch is gone (pruned or put back meanwhile).
fn walk_batch(
    root: &ShareRoot,
    name: &[u8],
    f: &mut dyn FnMut(RelPath, &crate::root::Stat),
) -> Result<bool, FsError> {
    match root.open_trash_batch(name) {
        Ok(dir) => walk(&dir, &RelPath::root(), f).map(|()| true),
        Err(e) if e.kind() == FsErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn walk(
    dir: &crate::root::DirHandle,
    at: &RelPath,
    f: &mut dyn FnMut(RelPath, &crate::root::Stat),
) -> Result<(), FsError> {
    for (name, stat) in dir.entries()? {
        let Ok(path) = at.join(&name) else {
            continue;
        };
        match stat.kind {
            FileKind::Dir => match dir.open_subdir(&name) {
                Ok(sub) => walk(&sub, &path, f)?,
                Err(e) if e.kind() == FsErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            FileKind::File | FileKind::Symlink => f(path, &stat),
            FileKind::Other => {}
        }
    }
    Ok(())
}

/// A batch vmsync made, by what its name says ([`parse_batch_name`]): its time and counter.
/// Ordered oldest first. Half the size of the name, and no allocation of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BatchId {
    pub time: Timestamp,
    pub n: u64,
}

impl BatchId {
    pub fn parse(name: &[u8]) -> Option<BatchId> {
        parse_batch_name(name).map(|(time, n)| BatchId { time, n })
    }

    /// The batch directory's name (names parse only in this canonical form).
    pub fn name(self) -> String {
        batch_name(self.time, self.n)
    }
}

/// What the trash holds, per batch, as the pruner keeps count: measured by a walk now and
/// then, and between walks added to as transitions report what they kept, so that pruning
/// costs no walk of every kept file.
#[derive(Debug, Default)]
pub struct TrashUsage {
    /// Batch → its files and bytes. Thousands under churn (about one a second within the
    /// hour that size pruning spares), so small entries.
    batches: BTreeMap<BatchId, (u64, u64)>,
    files: u64,
    bytes: u64,
    /// Thinning walks every batch left; it waits this long after its last walk, so that it
    /// costs at most about 1/[`THIN_COST_SHARE`] of a core's time.
    thin_after: Option<Instant>,
    /// The last prune left the trash over its size with thinning waiting for `thin_after`.
    thin_deferred: bool,
    /// When this process first saw each batch, and how old the batch was then: its age runs
    /// on from there by the monotonic clock, not from the time in its name, which the wall
    /// clock of its making wrote. A clock set years back or ahead while a batch was made then
    /// neither expires it at once nor keeps it for years once the clock is put right, and a
    /// clock moved while the agent runs ages no batch. A batch this process made is age 0 when
    /// made; one from an earlier run is as old as the later of its name and its directory's
    /// mtime say (whichever is not in the future; neither: age 0).
    seen: BTreeMap<BatchId, Sighting>,
    /// Each batch directory's mtime as far as this process knows (read by a walk, set by a
    /// stamp; a new batch's is its name's). Where the estimate of when a batch was made
    /// drifts more than [`STAMP_SLACK`] from it, the pruner writes the estimate there, so that
    /// the next run starts from what this one learnt (a clock put right meanwhile).
    on_disk: BTreeMap<BatchId, Timestamp>,
}

/// How far apart two times are, either way round.
fn gap(a: Timestamp, b: Timestamp) -> Duration {
    let nanos = |t: Timestamp| i128::from(t.secs) * 1_000_000_000 + i128::from(t.nanos);
    let d = (nanos(b) - nanos(a)).unsigned_abs();
    let secs = u64::try_from(d / 1_000_000_000).unwrap_or(u64::MAX);
    Duration::new(secs, (d % 1_000_000_000) as u32)
}

/// When this process first saw a batch ([`TrashUsage::seen`]), and the batch's age then.
#[derive(Debug, Clone, Copy)]
struct Sighting {
    at: Instant,
    age: Duration,
}

impl TrashUsage {
    /// Walks the whole trash. Batches with a name vmsync did not make are left out.
    pub fn measure(root: &ShareRoot) -> Result<TrashUsage, FsError> {
        let mut usage = TrashUsage::default();
        for name in root.trash_batches()? {
            let Some(id) = BatchId::parse(&name) else {
                continue;
            };
            let (mut n, mut bytes) = (0u64, 0u64);
            // A batch with nothing in it (a transition that failed midway) counts as empty.
            let there = walk_batch(root, &name, &mut |_, stat| {
                n += 1;
                bytes += stat.size;
            })?;
            if there {
                usage.insert(id, n, bytes);
                if let Some(mtime) = root.trash_batch_mtime(&name)? {
                    usage.on_disk.insert(id, mtime);
                }
            }
        }
        Ok(usage)
    }

    fn insert(&mut self, id: BatchId, files: u64, bytes: u64) {
        let e = self.batches.entry(id).or_insert((0, 0));
        e.0 += files;
        e.1 += bytes;
        self.files += files;
        self.bytes += bytes;
    }

    /// Counts `files` of `bytes` kept in `batch` (a name vmsync made; others are ignored).
    pub fn add(&mut self, batch: &str, files: u64, bytes: u64) {
        if let Some(id) = BatchId::parse(batch.as_bytes()) {
            self.insert(id, files, bytes);
        }
    }

    /// Notes that this process made `batch` (a transition kept something in it) at `at`.
    pub fn made(&mut self, batch: &str, at: Instant) {
        if let Some(id) = BatchId::parse(batch.as_bytes()) {
            self.seen.entry(id).or_insert(Sighting {
                at,
                age: Duration::ZERO,
            });
            self.on_disk.entry(id).or_insert(id.time);
        }
    }

    /// Takes the counts of a new walk (`walked`), keeping what this one knows of when each
    /// batch still there was made and when thinning is due.
    pub fn remeasured(&mut self, walked: TrashUsage) {
        let seen = std::mem::take(&mut self.seen);
        let thin_after = self.thin_after;
        *self = walked;
        self.thin_after = thin_after;
        self.seen = seen
            .into_iter()
            .filter(|(id, _)| self.batches.contains_key(id))
            .collect();
    }

    /// Writes the estimate of when each batch was made into its directory's mtime where the
    /// two drifted apart (see [`TrashUsage::on_disk`]). A failure costs the next run only the
    /// estimate: logged, not returned.
    fn stamp(&mut self, root: &ShareRoot, made: &[(BatchId, Timestamp)]) {
        for &(id, at) in made {
            let known = self.on_disk.get(&id).copied();
            if known.is_some_and(|t| gap(t, at) <= STAMP_SLACK) {
                continue;
            }
            match root.stamp_trash_batch(id.name().as_bytes(), at) {
                Ok(()) => {
                    self.on_disk.insert(id, at);
                }
                Err(e) => tracing::debug!("trash batch {} not stamped: {e}", id.name()),
            }
        }
    }

    /// The time a batch's age runs from: `now` minus its age ([`TrashUsage::seen`], noted at
    /// its first sight here).
    fn made_at(&mut self, id: BatchId, now: Timestamp) -> Timestamp {
        let on_disk = self.on_disk.get(&id).copied();
        let sight = *self.seen.entry(id).or_insert_with(|| {
            let made = [Some(id.time), on_disk]
                .into_iter()
                .flatten()
                .filter(|t| *t <= now)
                .max();
            Sighting {
                at: Instant::now(),
                age: made.map_or(Duration::ZERO, |t| gap(t, now)),
            }
        });
        let ago = sight.age.saturating_add(sight.at.elapsed());
        let secs = i64::try_from(ago.as_secs()).unwrap_or(i64::MAX);
        let (mut secs, mut nanos) = (now.secs.saturating_sub(secs), now.nanos);
        if nanos < ago.subsec_nanos() {
            secs = secs.saturating_sub(1);
            nanos += 1_000_000_000;
        }
        Timestamp::new(secs, nanos - ago.subsec_nanos())
    }

    /// Files and bytes in the trash.
    pub fn totals(&self) -> (u64, u64) {
        (self.files, self.bytes)
    }

    /// Applies the retention: removes expired and excess batches, oldest first (see
    /// [`plan_prune`]), then, if the trash is still over its size, thins what is left (see
    /// [`plan_thin`]). Returns the files and bytes kept afterwards.
    pub fn prune(
        &mut self,
        root: &ShareRoot,
        retention: Retention,
        share_bytes: u64,
        now: Timestamp,
    ) -> Result<(u64, u64), FsError> {
        let ids: Vec<(BatchId, u64)> = self.batches.iter().map(|(&id, &(_, b))| (id, b)).collect();
        let mut batches: Vec<BatchUsage> = ids
            .into_iter()
            .map(|(id, bytes)| BatchUsage {
                id,
                time: self.made_at(id, now),
                bytes,
                open: is_open(&id.name()),
            })
            .collect();
        let made: Vec<(BatchId, Timestamp)> = batches.iter().map(|b| (b.id, b.time)).collect();
        self.stamp(root, &made);
        // Oldest first.
        batches.sort_by_key(|b| (b.time, b.id));
        let remove = plan_prune(
            &batches,
            now,
            retention.max_age,
            retention.max_size.bytes(share_bytes),
        );
        for i in remove {
            let Some(b) = batches.get(i) else { continue };
            match root.remove_trash_batch(b.id.name().as_bytes()) {
                Ok(()) => {}
                Err(e) if e.kind() == FsErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some((files, bytes)) = self.batches.remove(&b.id) {
                self.files -= files;
                self.bytes -= bytes;
            }
            self.seen.remove(&b.id);
            self.on_disk.remove(&b.id);
        }
        let max_bytes = retention.max_size.bytes(share_bytes);
        let thin_now = self.thin_after.is_none_or(|t| Instant::now() >= t);
        self.thin_deferred = self.bytes > max_bytes && !thin_now;
        if self.bytes > max_bytes && thin_now {
            let started = Instant::now();
            let counted = self.totals();
            self.thin(root, max_bytes)?;
            let cost = started.elapsed();
            tracing::debug!(
                "trash thinned in {} ms: counted {} files of {} bytes; {} files of {} bytes left, limit {max_bytes}",
                cost.as_millis(),
                counted.0,
                counted.1,
                self.files,
                self.bytes
            );
            self.thin_after = Some(Instant::now() + cost * THIN_COST_SHARE);
        }
        Ok(self.totals())
    }

    /// Whether the last prune left thinning to do that waits for its walk's cost to pass: the
    /// pruner prunes again then, even if nothing more is kept.
    pub fn thin_deferred(&self) -> bool {
        self.thin_deferred
    }

    /// Removes kept versions from the batches no transition is writing into, by the rule of
    /// [`plan_thin`]. Two walks, neither of which lists the trash: the first counts each batch
    /// again (what it decides from is what is on disk, not what transitions said they kept) and
    /// notes each path's ends ([`ThinEnds`]); the second, oldest batch first, removes middle
    /// versions until the trash is under `max_bytes`.
    fn thin(&mut self, root: &ShareRoot, max_bytes: u64) -> Result<(), FsError> {
        // Oldest first, as the map is ordered.
        let ids: Vec<BatchId> = self
            .batches
            .keys()
            .copied()
            .filter(|id| !is_open(&id.name()))
            .collect();
        let mut ends = ThinEnds::default();
        for (i, &id) in (0u32..).zip(&ids) {
            let (mut files, mut bytes) = (0u64, 0u64);
            let there = walk_batch(root, id.name().as_bytes(), &mut |path, stat| {
                ends.see(i, &path);
                files += 1;
                bytes += stat.size;
            })?;
            if there {
                self.batches.insert(id, (files, bytes));
            } else {
                self.batches.remove(&id);
            }
        }
        self.recount();
        for (i, &id) in (0u32..).zip(&ids) {
            if self.bytes <= max_bytes {
                break;
            }
            let name = id.name();
            let batch = name.as_str();
            let mut total = self.bytes;
            let (mut files_gone, mut bytes_gone) = (0u64, 0u64);
            let mut failed = None;
            walk_batch(root, batch.as_bytes(), &mut |path, stat| {
                if failed.is_some() || total <= max_bytes || !ends.is_middle(i, &path) {
                    return;
                }
                match root.remove_kept(batch, &path) {
                    Ok(()) => {
                        files_gone += 1;
                        bytes_gone += stat.size;
                        total = total.saturating_sub(stat.size);
                    }
                    Err(e) => failed = Some(e),
                }
            })?;
            if let Some((files, bytes)) = self.batches.get_mut(&id) {
                *files = files.saturating_sub(files_gone);
                *bytes = bytes.saturating_sub(bytes_gone);
            }
            self.recount();
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The totals again from the batches' counts.
    fn recount(&mut self) {
        self.files = self.batches.values().map(|&(f, _)| f).sum();
        self.bytes = self.batches.values().map(|&(_, b)| b).sum();
    }
}

/// Measures the trash and applies the retention once (see [`TrashUsage`]). Returns the files
/// and bytes kept afterwards.
pub fn prune_once(
    root: &ShareRoot,
    retention: Retention,
    share_bytes: u64,
    now: Timestamp,
) -> Result<(u64, u64), FsError> {
    TrashUsage::measure(root)?.prune(root, retention, share_bytes, now)
}

/// The trash's file count and bytes, as the pruner last counted them (for `status`).
#[derive(Debug, Default)]
pub struct TrashTotals {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

impl TrashTotals {
    pub fn get(&self) -> (u64, u64) {
        (
            self.files.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn set(&self, (files, bytes): (u64, u64)) {
        self.files.store(files, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }
}

/// What the pruner is told.
#[derive(Debug)]
enum Note {
    /// A transition kept this many files and bytes in this batch.
    Kept(String, u64, u64),
    /// The trash changed in a way not counted (something was put back from it): walk it.
    Measure,
}

/// The background pruner of one share (its own thread; a sync never waits for it). It keeps
/// the trash's usage per batch ([`TrashUsage`]): walked at start and every [`MEASURE_EVERY`]
/// (what others did to the trash: `restore`, a user deleting from it), and added to as
/// transitions report what they kept ([`Pruner::kept`]). It prunes at most every
/// [`PRUNE_MIN_GAP`] after something was kept, and after every walk. Stops when dropped.
#[derive(Debug)]
pub struct Pruner {
    notes: std::sync::mpsc::Sender<Note>,
}

impl Pruner {
    /// Starts the pruner thread for the share at `path`. `share_bytes` is the size of what
    /// the side indexes, kept current by its owner; `totals` receives what the trash holds.
    pub fn spawn(
        share: String,
        path: PathBuf,
        retention: Retention,
        share_bytes: Arc<AtomicU64>,
        totals: Arc<TrashTotals>,
    ) -> std::io::Result<Pruner> {
        use std::sync::mpsc::RecvTimeoutError;
        let (notes, rx) = std::sync::mpsc::channel::<Note>();
        std::thread::Builder::new()
            .name(format!("vmsync-prune-{share}"))
            .spawn(move || {
                let mut usage = TrashUsage::default();
                // A walk is due at once; then every MEASURE_EVERY, or when told.
                let mut measure_at = Instant::now();
                let mut pruned_at: Option<Instant> = None;
                let mut unpruned = false;
                loop {
                    let now = Instant::now();
                    let prune_at = pruned_at.map_or(now, |t| t + PRUNE_MIN_GAP);
                    let next = if unpruned {
                        prune_at.min(measure_at)
                    } else {
                        measure_at
                    };
                    match rx.recv_timeout(next.saturating_duration_since(now)) {
                        Ok(note) => {
                            // What else is queued, at once.
                            for note in std::iter::once(note).chain(rx.try_iter()) {
                                match note {
                                    Note::Kept(batch, files, bytes) => {
                                        usage.made(&batch, Instant::now());
                                        usage.add(&batch, files, bytes);
                                        unpruned = true;
                                    }
                                    Note::Measure => measure_at = Instant::now(),
                                }
                            }
                            totals.set(usage.totals());
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let now = Instant::now();
                    if now < measure_at && !(unpruned && now >= prune_at) {
                        continue;
                    }
                    let root = match ShareRoot::open(&path) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::debug!(share = %share, "trash not pruned: {e}");
                            measure_at = now + MEASURE_EVERY;
                            continue;
                        }
                    };
                    if now >= measure_at {
                        measure_at = now + MEASURE_EVERY;
                        match TrashUsage::measure(&root) {
                            Ok(u) => usage.remeasured(u),
                            Err(e) => tracing::warn!(share = %share, "measuring the trash: {e}"),
                        }
                    }
                    pruned_at = Some(now);
                    let bytes = share_bytes.load(Ordering::Relaxed);
                    if let Err(e) = usage.prune(&root, retention, bytes, crate::trash::now()) {
                        tracing::warn!(share = %share, "pruning the trash: {e}");
                    }
                    // Thinning that waits for its cost: due again even if nothing is kept.
                    unpruned = usage.thin_deferred();
                    totals.set(usage.totals());
                }
            })?;
        Ok(Pruner { notes })
    }

    /// A transition kept `files` files of `bytes` bytes in `batch`.
    pub fn kept(&self, batch: String, files: u64, bytes: u64) {
        let _ = self.notes.send(Note::Kept(batch, files, bytes));
    }

    /// Something left the trash uncounted (it was put back): walk it again.
    pub fn measure(&self) {
        let _ = self.notes.send(Note::Measure);
    }
}

/// Recent trash moves of one side, for `put_back`: path → where each went and what it was.
/// Bounded by [`PUT_BACK_WINDOW`] and [`MAX_PUT_BACK_RECORDS`].
#[derive(Debug, Default)]
pub struct KeptLog {
    by_path: HashMap<RelPath, Vec<(u64, Arc<str>, Entry)>>,
    order: VecDeque<(Instant, u64, RelPath)>,
    seq: u64,
    /// The batch of the last record: the next ones (a batch takes a second of keeping)
    /// share its name.
    batch: Option<Arc<str>>,
}

impl KeptLog {
    pub fn record(&mut self, at: Instant, path: RelPath, batch: String, entry: Entry) {
        self.expire(at);
        while self.order.len() >= MAX_PUT_BACK_RECORDS {
            self.pop_oldest();
        }
        self.seq += 1;
        let batch = match &self.batch {
            Some(b) if **b == *batch => b.clone(),
            _ => {
                let b: Arc<str> = batch.into();
                self.batch = Some(b.clone());
                b
            }
        };
        // Most paths are kept once in the window: a default `Vec` would reserve room for four
        // records (about 400 bytes) on the first push.
        self.by_path
            .entry(path.clone())
            .or_insert_with(|| Vec::with_capacity(1))
            .push((self.seq, batch, entry));
        self.order.push_back((at, self.seq, path));
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > PUT_BACK_WINDOW)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, seq, path)) = self.order.pop_front() {
            self.forget(&path, seq);
        }
    }

    fn forget(&mut self, path: &RelPath, seq: u64) {
        if let Some(v) = self.by_path.get_mut(path) {
            v.retain(|(s, _, _)| *s != seq);
            if v.is_empty() {
                self.by_path.remove(path);
            }
        }
    }

    /// The newest remembered trash move of `path` whose entry is the same version as
    /// `entry` (kind, size, mtime, symlink target): its sequence number and batch.
    pub fn find(&mut self, now: Instant, path: &RelPath, entry: &Entry) -> Option<(u64, String)> {
        self.expire(now);
        self.by_path
            .get(path)?
            .iter()
            .rev()
            .find_map(|(seq, batch, e)| same_version(e, entry).then(|| (*seq, batch.to_string())))
    }

    /// Forgets one move (it was put back).
    pub fn take(&mut self, path: &RelPath, seq: u64) {
        self.forget(path, seq);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Whether two entries are the same kept version: kind, size, mtime, symlink target.
pub fn same_version(a: &Entry, b: &Entry) -> bool {
    match (a, b) {
        (Entry::File(x), Entry::File(y)) => x.size == y.size && x.mtime == y.mtime,
        (Entry::Symlink { target: x, .. }, Entry::Symlink { target: y, .. }) => x == y,
        (Entry::Dir { .. }, Entry::Dir { .. }) => true,
        _ => false,
    }
}

/// What `restore` should put back.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Only versions trashed at or after this time.
    pub since: Option<Timestamp>,
    /// Only these paths and what is beneath them; empty: everything.
    pub paths: Vec<RelPath>,
    pub dry_run: bool,
}

/// What `restore` did (or, dry, would do) for one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreLine {
    /// Escaped.
    pub path: String,
    pub batch: String,
    /// `restored`, `replaced` (an older file was there; it was trashed first) or `skipped`.
    pub action: &'static str,
    pub reason: Option<String>,
}

/// Puts back the newest kept version of each selected path (see [`RestoreOptions`]), parents
/// first. Never over a directory or over a file or symlink whose mtime is not older than the
/// kept version's: those are skipped with the reason. An older file there is kept in the trash
/// first, then replaced. Missing parent directories are created (mode 0755).
pub fn restore(root: &ShareRoot, opts: &RestoreOptions) -> Result<Vec<RestoreLine>, FsError> {
    let mut newest: std::collections::BTreeMap<RelPath, KeptItem> = Default::default();
    for item in list(root)? {
        if opts.since.is_some_and(|s| item.time < s) {
            continue;
        }
        if !opts.paths.is_empty()
            && !opts
                .paths
                .iter()
                .any(|p| *p == item.path || p.is_root() || p.is_ancestor_of(&item.path))
        {
            continue;
        }
        match newest.get(&item.path) {
            Some(old) if (old.time, &old.batch) >= (item.time, &item.batch) => {}
            _ => {
                newest.insert(item.path.clone(), item);
            }
        }
    }
    let mut out = Vec::new();
    let batch = (!opts.dry_run).then(|| root.batch());
    for (path, item) in newest {
        let line = |action: &'static str, reason: Option<String>| RestoreLine {
            path: path.escaped(),
            batch: item.batch.clone(),
            action,
            reason,
        };
        let result = restore_one(root, &path, &item, opts.dry_run);
        out.push(match result {
            Ok(Ok(replaced)) => line(if replaced { "replaced" } else { "restored" }, None),
            Ok(Err(why)) => line("skipped", Some(why)),
            Err(e) => line("skipped", Some(e.to_string())),
        });
    }
    if let Some(batch) = batch {
        batch.finish()?;
    }
    Ok(out)
}

/// `Ok(Ok(replaced))` when put back (or, dry, when it would be), `Ok(Err(why))` when skipped.
fn restore_one(
    root: &ShareRoot,
    path: &RelPath,
    item: &KeptItem,
    dry: bool,
) -> Result<Result<bool, String>, FsError> {
    let mut missing = Vec::new();
    for anc in path.ancestors() {
        if anc.is_root() || anc == *path {
            continue;
        }
        match root.stat(&anc)? {
            Some(s) if s.kind == FileKind::Dir => {}
            Some(_) => return Ok(Err(format!("{} is not a directory", anc.escaped()))),
            None => missing.push(anc),
        }
    }
    let existing = root.stat(path)?;
    let replaced = match &existing {
        None => false,
        Some(s) if matches!(s.kind, FileKind::Dir | FileKind::Other) => {
            return Ok(Err("something that is not a file is there".into()))
        }
        Some(s) if s.mtime >= item.mtime => {
            return Ok(Err(
                "the file there is not older than the kept version".into()
            ))
        }
        Some(_) => true,
    };
    if dry {
        return Ok(Ok(replaced));
    }
    missing.sort();
    for dir in missing {
        match root.mkdir(&dir, 0o755) {
            Ok(()) => {}
            Err(e) if e.kind() == FsErrorKind::Exists => {}
            Err(e) => return Err(e),
        }
    }
    if replaced {
        root.trash_remove(path)?;
    }
    root.restore_kept(&item.batch, &item.path, path)?;
    Ok(Ok(replaced))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_names_round_trip_and_sort_by_time() {
        let cases = [
            (Timestamp::new(0, 0), 0, "19700101T000000.000000000Z-0"),
            (
                Timestamp::new(1_796_545_004, 123_456_789),
                42,
                "20261206T081644.123456789Z-42",
            ),
            (
                Timestamp::new(951_782_400, 1),
                7,
                "20000229T000000.000000001Z-7",
            ),
            (
                Timestamp::new(253_402_300_799, 999_999_999),
                u64::MAX,
                "99991231T235959.999999999Z-18446744073709551615",
            ),
        ];
        for (t, n, name) in cases {
            assert_eq!(batch_name(t, n), name);
            assert_eq!(parse_batch_name(name.as_bytes()), Some((t, n)), "{name}");
        }
        let a = batch_name(Timestamp::new(1_796_545_004, 5), 9);
        let b = batch_name(Timestamp::new(1_796_545_004, 6), 1);
        assert!(a < b);
    }

    #[test]
    fn batch_name_parser_refuses_what_we_do_not_make() {
        for junk in [
            "",
            "tmp",
            "20261206T081644.123456789Z",
            "20261206T081644.123456789Z-",
            "20261206T081644.123456789Z-x",
            "20261206T081644.12345678Z-1",
            "20261306T081644.123456789Z-1",
            "20260230T081644.123456789Z-1",
            "20261206T246644.123456789Z-1",
            "20261206T081644.123456789Z-01",
            "20261206T081644.123456789Z-+1",
            "2026120T6081644.123456789Z-1",
        ] {
            assert_eq!(parse_batch_name(junk.as_bytes()), None, "{junk:?}");
        }
    }

    #[test]
    fn durations_sizes_and_times_parse() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "d", "7", "7w", "-1d", "1.5h", " 7d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(SizeLimit::parse("10%"), Ok(SizeLimit::Percent(10)));
        assert_eq!(SizeLimit::parse("5GiB"), Ok(SizeLimit::Bytes(5 << 30)));
        assert_eq!(SizeLimit::parse("500MB"), Ok(SizeLimit::Bytes(500_000_000)));
        assert_eq!(SizeLimit::parse("1000"), Ok(SizeLimit::Bytes(1000)));
        for bad in ["", "%", "101%", "5 GiB", "5gb", "GiB", "-1", "1.5GiB"] {
            assert!(SizeLimit::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(SizeLimit::Percent(10).bytes(1000), MIN_PERCENT_LIMIT_BYTES);
        assert_eq!(SizeLimit::Percent(10).bytes(10 << 30), 1 << 30);
        let now = Timestamp::new(1_796_545_004, 7);
        assert_eq!(
            parse_since("2026-12-06T08:16:44Z", now),
            Ok(Timestamp::new(1_796_545_004, 0))
        );
        assert_eq!(
            parse_since("2026-12-06T08:16:44.5Z", now),
            Ok(Timestamp::new(1_796_545_004, 500_000_000))
        );
        assert_eq!(
            parse_since("10m", now),
            Ok(Timestamp::new(1_796_545_004 - 600, 7))
        );
        for bad in [
            "2026-12-06 08:16:44",
            "2026-12-06T08:16:44+01:00",
            "yesterday",
            "2026-02-30T00:00:00Z",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad:?}");
        }
    }

    fn usage(secs: i64, bytes: u64) -> BatchUsage {
        BatchUsage {
            id: BatchId {
                time: Timestamp::new(secs, 0),
                n: 0,
            },
            time: Timestamp::new(secs, 0),
            bytes,
            open: false,
        }
    }

    #[test]
    fn pruning_by_age_and_by_size() {
        let day = Duration::from_secs(86_400);
        let now = Timestamp::new(10 * 86_400, 0);
        // (batches: (age in days, bytes), max_age, max_bytes, open index, expected removals)
        type Case = (
            &'static str,
            Vec<(i64, u64)>,
            Duration,
            u64,
            Option<usize>,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing to do",
                vec![(3, 10), (2, 10)],
                7 * day,
                100,
                None,
                vec![],
            ),
            (
                "expired by age",
                vec![(9, 10), (8, 10), (2, 10)],
                7 * day,
                100,
                None,
                vec![0, 1],
            ),
            (
                "oldest first until under the size",
                vec![(5, 40), (4, 40), (3, 40), (1, 40)],
                7 * day,
                90,
                None,
                vec![0, 1],
            ),
            (
                "the newest stays even alone over the size",
                vec![(2, 50), (1, 500)],
                7 * day,
                100,
                None,
                vec![0],
            ),
            (
                "the newest goes when it is expired",
                vec![(8, 500)],
                7 * day,
                1000,
                None,
                vec![0],
            ),
            (
                "an open batch is never removed",
                vec![(9, 50), (8, 50), (1, 50)],
                7 * day,
                60,
                Some(0),
                vec![1],
            ),
            (
                "size never removes what was kept within the hour",
                vec![(3, 100), (0, 100), (0, 100)],
                7 * day,
                0,
                None,
                vec![0],
            ),
            (
                "size zero keeps only the newest",
                vec![(3, 1), (2, 1), (1, 1)],
                7 * day,
                0,
                None,
                vec![0, 1],
            ),
        ];
        for (what, batches, max_age, max_bytes, open, want) in cases {
            let mut v: Vec<BatchUsage> = batches
                .iter()
                .map(|&(days, b)| usage(now.secs - days * 86_400 - 1, b))
                .collect();
            if let Some(i) = open {
                v[i].open = true;
            }
            assert_eq!(plan_prune(&v, now, max_age, max_bytes), want, "{what}");
        }
    }

    fn versions(list: &[(usize, &str, u64)]) -> Vec<KeptVersion> {
        list.iter()
            .map(|&(batch, path, bytes)| KeptVersion {
                batch,
                path: RelPath::from_bytes(path.as_bytes()).unwrap(),
                bytes,
            })
            .collect()
    }

    #[test]
    fn thinning_keeps_each_paths_oldest_and_newest() {
        // (what, versions (batch, path, bytes), max_bytes, expected removals)
        type Case = (
            &'static str,
            Vec<(usize, &'static str, u64)>,
            u64,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            (
                "under the size: nothing",
                vec![(0, "a", 10), (1, "a", 10), (2, "a", 10)],
                30,
                vec![],
            ),
            (
                "one path rewritten: the middle versions go, oldest first, until under",
                vec![(0, "a", 10), (1, "a", 10), (2, "a", 10), (3, "a", 10)],
                25,
                vec![1, 2],
            ),
            (
                "stops as soon as it is under",
                vec![(0, "a", 10), (1, "a", 10), (2, "a", 10), (3, "a", 10)],
                30,
                vec![1],
            ),
            (
                "a wipe (one version per path) is never thinned",
                vec![(0, "a", 10), (0, "b", 10), (0, "c", 10)],
                0,
                vec![],
            ),
            (
                "two versions of a path both stay",
                vec![(0, "a", 10), (1, "a", 10), (1, "b", 10), (2, "b", 10)],
                0,
                vec![],
            ),
            (
                "paths interleaved: each keeps its own ends",
                vec![
                    (0, "a", 5),
                    (0, "b", 7),
                    (1, "a", 5),
                    (1, "b", 7),
                    (2, "a", 5),
                    (2, "b", 7),
                    (3, "c", 100),
                ],
                0,
                vec![2, 3],
            ),
        ];
        for (what, list, max, want) in cases {
            let v = versions(&list);
            let total = v.iter().map(|v| v.bytes).sum();
            assert_eq!(plan_thin(&v, total, max), want, "{what}");
        }
    }

    proptest::proptest! {
        /// Whatever the trash holds, thinning never removes a path's oldest or newest version,
        /// removes oldest first, and stops once under the limit or out of middle versions.
        #[test]
        fn thinning_spares_the_ends_and_stops_when_under(
            raw in proptest::collection::vec((0usize..4, 0u64..1000), 0..60),
            max in 0u64..20_000,
        ) {
            let list: Vec<(usize, String, u64)> = raw
                .iter()
                .enumerate()
                .map(|(i, &(p, b))| (i, format!("p{p}"), b))
                .collect();
            let v: Vec<KeptVersion> = list
                .iter()
                .map(|(i, p, b)| KeptVersion {
                    batch: *i,
                    path: RelPath::from_bytes(p.as_bytes()).unwrap(),
                    bytes: *b,
                })
                .collect();
            let total: u64 = v.iter().map(|v| v.bytes).sum();
            let remove = plan_thin(&v, total, max);
            proptest::prop_assert!(remove.windows(2).all(|w| w[0] < w[1]));
            for &i in &remove {
                let p = &v[i].path;
                proptest::prop_assert!(v[..i].iter().any(|o| &o.path == p), "oldest removed");
                proptest::prop_assert!(v[i + 1..].iter().any(|o| &o.path == p), "newest removed");
            }
            let left = total - remove.iter().map(|&i| v[i].bytes).sum::<u64>();
            let middle = |i: usize| {
                v[..i].iter().any(|o| o.path == v[i].path)
                    && v[i + 1..].iter().any(|o| o.path == v[i].path)
            };
            let spared_middle = (0..v.len()).any(|i| middle(i) && !remove.contains(&i));
            if spared_middle {
                // Stopped because it was under, and only just: the last removal was needed.
                proptest::prop_assert!(left <= max);
                if let Some(&last) = remove.last() {
                    proptest::prop_assert!(left + v[last].bytes > max);
                }
            }
        }
    }

    fn file(size: u64, secs: i64) -> Entry {
        Entry::File(vmsync_core::FileMeta {
            size,
            mode: 0o644,
            mtime: Timestamp::new(secs, 0),
            digest: vmsync_core::Hash([0; 32]),
        })
    }

    #[test]
    fn kept_log_finds_the_newest_matching_version_and_forgets_old_ones() {
        let p = RelPath::from_bytes(b"a/b").unwrap();
        let t0 = Instant::now();
        let mut log = KeptLog::default();
        log.record(t0, p.clone(), "b1".into(), file(3, 1));
        log.record(t0, p.clone(), "b2".into(), file(3, 2));
        log.record(t0, p.clone(), "b3".into(), file(3, 1));
        let (seq, batch) = log.find(t0, &p, &file(3, 1)).unwrap();
        assert_eq!(batch, "b3");
        log.take(&p, seq);
        assert_eq!(log.find(t0, &p, &file(3, 1)).unwrap().1, "b1");
        assert_eq!(log.find(t0, &p, &file(4, 1)), None);
        assert_eq!(
            log.find(
                t0,
                &p,
                &Entry::Symlink {
                    target: b"x".to_vec(),
                    mtime: Default::default(),
                }
            ),
            None
        );
        let later = t0 + PUT_BACK_WINDOW + Duration::from_secs(1);
        assert_eq!(log.find(later, &p, &file(3, 2)), None);
        assert!(log.is_empty());
    }

    /// A batch `name` holding one 4-byte file, its directory dated as if made by a clock that
    /// said the name's time.
    fn keep_in_batch(root: &ShareRoot, share: &std::path::Path, name: &str) {
        let dir = share.join(".vmsync/trash").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), b"kept").unwrap();
        let (made, _) = parse_batch_name(name.as_bytes()).unwrap();
        root.stamp_trash_batch(name.as_bytes(), made).unwrap();
    }

    /// Counted as transitions report it, the trash prunes as a walk of it would: the same
    /// batches go, and the counts follow.
    /// Age runs from when this process saw a batch made (or, named in the future, first saw
    /// it), whatever its name says: a batch named 20 years back that was made just now stays;
    /// one named 20 years ahead ages from its first sight and expires `keep_deleted` after it;
    /// one this process did not see made ages by its name. A walk keeps what was seen.
    #[test]
    fn a_batch_ages_from_when_it_was_seen_made_not_from_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(tmp.path()).unwrap();
        let t = now();
        let year = 365 * 86_400;
        let named = |secs: i64, n| batch_name(Timestamp::new(t.secs + secs, 0), n);
        let (behind, ahead, old) = (
            named(-20 * year, 1),
            named(20 * year, 2),
            named(-20 * year, 3),
        );
        for name in [&behind, &ahead, &old] {
            keep_in_batch(&root, tmp.path(), name);
        }
        let mut usage = TrashUsage::default();
        usage.made(&behind, Instant::now());
        usage.remeasured(TrashUsage::measure(&root).unwrap());
        let second = Retention {
            max_age: Duration::from_secs(1),
            max_size: SizeLimit::Percent(100),
        };
        assert_eq!(usage.prune(&root, second, 1 << 30, t).unwrap(), (2, 8));
        let left = |root: &ShareRoot| {
            let mut names: Vec<Vec<u8>> = root.trash_batches().unwrap();
            names.sort();
            names
        };
        assert_eq!(
            left(&root),
            [behind.clone().into_bytes(), ahead.clone().into_bytes()]
        );
        // Two seconds on by the monotonic clock, the wall clock standing still: both expire.
        for (id, sight) in usage.seen.iter_mut() {
            assert!([&behind, &ahead].contains(&&id.name()));
            sight.at = sight.at.checked_sub(Duration::from_secs(2)).unwrap();
        }
        assert_eq!(usage.prune(&root, second, 1 << 30, t).unwrap(), (0, 0));
        assert!(left(&root).is_empty());
    }

    /// What a run learns of when a batch was made outlives it: a batch made while the clock
    /// was 20 years behind, the clock put right while the agent ran, gets its directory's
    /// mtime stamped, and the next run (a new walk) ages it from there, not from its name; a
    /// batch of the same name time that no run stamped is pruned by its name. And a clock moved
    /// while the agent runs ages no batch it has seen.
    #[test]
    fn a_batch_keeps_its_age_across_a_restart_and_clock_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(tmp.path()).unwrap();
        let t = now();
        let year = 365 * 86_400;
        let named = |secs: i64, n| batch_name(Timestamp::new(t.secs + secs, 0), n);
        let (behind, old, hour) = (named(-20 * year, 1), named(-20 * year, 2), named(-3600, 3));
        for name in [&behind, &old, &hour] {
            keep_in_batch(&root, tmp.path(), name);
        }
        let day = Retention {
            max_age: Duration::from_secs(86_400),
            max_size: SizeLimit::Percent(100),
        };
        let mtime = |name: &str| root.trash_batch_mtime(name.as_bytes()).unwrap().unwrap();
        let mut first = TrashUsage::default();
        first.made(&behind, Instant::now());
        first.remeasured(TrashUsage::measure(&root).unwrap());
        // The old, unstamped batch goes by its name; `behind` is stamped with about now.
        assert_eq!(first.prune(&root, day, 1 << 30, t).unwrap(), (2, 8));
        assert!(gap(mtime(&behind), t) < STAMP_SLACK, "{:?}", mtime(&behind));
        // The clock jumps 20 years ahead while this run goes on: nothing it saw ages.
        let ahead = Timestamp::new(t.secs + 20 * year, 0);
        assert_eq!(first.prune(&root, day, 1 << 30, ahead).unwrap(), (2, 8));
        // Put right again, then a new run: `behind` ages from its stamp, `hour` by its name.
        assert_eq!(first.prune(&root, day, 1 << 30, t).unwrap(), (2, 8));
        let mut second = TrashUsage::default();
        second.remeasured(TrashUsage::measure(&root).unwrap());
        assert_eq!(second.prune(&root, day, 1 << 30, t).unwrap(), (2, 8));
        let mut names: Vec<Vec<u8>> = root.trash_batches().unwrap();
        names.sort();
        assert_eq!(names, [behind.into_bytes(), hour.into_bytes()]);
        let _ = old;
    }

    #[test]
    fn usage_counted_as_kept_prunes_like_a_walk() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(tmp.path()).unwrap();
        let t = now();
        let batches = [
            (
                batch_name(Timestamp::new(t.secs - 7200, 0), 1),
                vec![("a", 300), ("d/b", 200)],
            ),
            (
                batch_name(Timestamp::new(t.secs - 5400, 0), 2),
                vec![("c", 500)],
            ),
            (
                batch_name(Timestamp::new(t.secs - 60, 0), 3),
                vec![("e", 100)],
            ),
        ];
        let mut counted = TrashUsage::default();
        for (name, files) in &batches {
            for (path, size) in files {
                let at = tmp.path().join(".vmsync/trash").join(name).join(path);
                std::fs::create_dir_all(at.parent().unwrap()).unwrap();
                std::fs::write(&at, vec![7u8; *size]).unwrap();
                counted.add(name, 1, *size as u64);
            }
        }
        counted.add("not-a-batch", 1, 1);
        let mut walked = TrashUsage::measure(&root).unwrap();
        assert_eq!(walked.totals(), (4, 1100));
        assert_eq!(counted.totals(), walked.totals());
        // At most 500 bytes: the two oldest go (both older than SIZE_PRUNE_MIN_AGE), not the
        // newest.
        let limit = Retention {
            max_age: Duration::from_secs(DEFAULT_KEEP_DELETED_SECS),
            max_size: SizeLimit::Bytes(500),
        };
        assert_eq!(counted.prune(&root, limit, 0, t).unwrap(), (1, 100));
        assert_eq!(walked.prune(&root, limit, 0, t).unwrap(), (1, 100));
        let left: Vec<String> = std::fs::read_dir(tmp.path().join(".vmsync/trash"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec![batches[2].0.clone()]);
        assert_eq!(TrashUsage::measure(&root).unwrap().totals(), (1, 100));
    }

    /// Hours of steady churn (25 trash moves a second, every one a new path, as renames and
    /// fresh files are) hold only the moves of the last `PUT_BACK_WINDOW`, in both maps, each
    /// path's list sized for what it holds.
    #[test]
    fn kept_log_under_steady_churn_holds_only_the_window() {
        let t0 = Instant::now();
        let per_sec = 25u64;
        let bound = (PUT_BACK_WINDOW.as_secs() * per_sec + 1) as usize;
        let mut log = KeptLog::default();
        for i in 0..3 * 3600 * per_sec {
            let now = t0 + Duration::from_millis(i * 1000 / per_sec);
            let path = RelPath::from_bytes(format!("d{}/f{i}", i % 50).as_bytes()).unwrap();
            log.record(now, path, "batch".into(), file(i, 1));
            assert!(log.len() <= bound, "{} records after {i} moves", log.len());
        }
        assert!(log.by_path.len() <= bound);
        assert!(log.by_path.values().all(|v| v.capacity() == 1));
    }
}
