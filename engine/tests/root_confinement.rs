//! Confinement tests for `vmsync_engine::root` (docs/security.md, "Paths and symlinks").
//!
//! Each test keeps an `OUT` directory beside the share with known content (files, a directory,
//! a FIFO, a symlink) and checks it is untouched afterwards: same listing, kinds, modes, mtimes,
//! inodes and bytes. Every test runs with both resolutions (`openat2` and the fallback walk).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use vmsync_core::{RelPath, Timestamp};
use vmsync_engine::root::{
    symlink_target_is_contained, FileKind, FsError, FsErrorKind, Resolver, ShareRoot, Stat,
    TempFile,
};

const RESOLVERS: [Resolver; 2] = [Resolver::Auto, Resolver::Walk];

/// Commits `t` at `p` as a transition would: in place of the file or symlink there (as if kept
/// first), or as a new file where there is none.
fn commit(
    root: &ShareRoot,
    t: TempFile,
    p: &RelPath,
    mode: u32,
    mtime: Timestamp,
) -> Result<Stat, FsError> {
    match root.stat(p) {
        Ok(Some(st)) if matches!(st.kind, FileKind::File | FileKind::Symlink) => {
            root.commit_temp(t, p, mode, mtime, st.ino)
        }
        _ => root.commit_temp_new(t, p, mode, mtime),
    }
}

/// Replaces what is at `p` with a symlink to `target`, as a transition would.
fn replace_with_symlink(root: &ShareRoot, p: &RelPath, target: &[u8]) -> Result<(), FsError> {
    let kept = root.stat(p).ok().flatten().map_or(0, |st| st.ino);
    root.replace_with_symlink(p, target, kept)
}

fn rp(s: &[u8]) -> RelPath {
    RelPath::from_bytes(s).unwrap()
}

fn ts(secs: i64, nanos: u32) -> Timestamp {
    Timestamp::new(secs, nanos)
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// One entry of a tree snapshot: relative path, file type and permission bits, mtime, inode,
/// and the bytes (file content or symlink target; nothing for directories and FIFOs).
type Snap = Vec<(PathBuf, u32, i64, i64, u64, Vec<u8>)>;

fn snapshot(dir: &Path) -> Snap {
    let mut out = Vec::new();
    snap_into(dir, dir, &mut out);
    out.sort();
    out
}

fn snap_into(base: &Path, p: &Path, out: &mut Snap) {
    let m = fs::symlink_metadata(p).unwrap();
    let rel = p.strip_prefix(base).unwrap().to_path_buf();
    if rel.as_os_str().as_bytes() == b".vmsync" {
        return;
    }
    let ft = m.file_type();
    let bytes = if ft.is_file() {
        fs::read(p).unwrap()
    } else if ft.is_symlink() {
        fs::read_link(p).unwrap().into_os_string().into_vec()
    } else {
        Vec::new()
    };
    out.push((rel, m.mode(), m.mtime(), m.mtime_nsec(), m.ino(), bytes));
    if ft.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            snap_into(base, &e.unwrap().path(), out);
        }
    }
}

fn mkfifo(p: &Path) {
    rustix::fs::mkfifoat(rustix::fs::CWD, p, rustix::fs::Mode::from_raw_mode(0o644)).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    share: PathBuf,
    out: PathBuf,
    before: Snap,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        let out = tmp.path().join("OUT");
        fs::create_dir(&share).unwrap();
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("x"), b"outside x").unwrap();
        fs::write(out.join("secret"), b"secret").unwrap();
        fs::write(out.join("sub/x"), b"outside sub/x").unwrap();
        fs::set_permissions(out.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        mkfifo(&out.join("fifo"));
        symlink("secret", out.join("link")).unwrap();
        let before = snapshot(&out);
        Fixture {
            _tmp: tmp,
            share,
            out,
            before,
        }
    }

    fn root(&self, r: Resolver) -> ShareRoot {
        ShareRoot::open_with(&self.share, r).unwrap()
    }

    /// Takes the reference snapshot again (after a test deliberately links to OUT).
    fn reseal(&mut self) {
        self.before = snapshot(&self.out);
    }

    fn assert_out_untouched(&self) {
        assert_eq!(snapshot(&self.out), self.before, "OUT changed");
    }

    fn tmp_entries(&self) -> usize {
        fs::read_dir(self.share.join(".vmsync/tmp"))
            .unwrap()
            .count()
    }
}

/// A mount a test made, lazily unmounted when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(r: Result<T, FsError>, want: FsErrorKind, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {want:?}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), want, "{what}: {e}"),
    }
}

/// Runs every mutating and reading operation at `p` and asserts each is refused with `want`.
fn every_op_refused(root: &ShareRoot, p: &RelPath, want: FsErrorKind) {
    let s = p.to_string();
    assert_kind(root.stat(p), want, &format!("stat {s}"));
    assert_kind(root.open_file(p), want, &format!("open_file {s}"));
    assert_kind(root.open_dir(p), want, &format!("open_dir {s}"));
    assert_kind(root.read_link(p), want, &format!("read_link {s}"));
    assert_kind(root.mkdir(p, 0o777), want, &format!("mkdir {s}"));
    assert_kind(root.symlink(p, b"y"), want, &format!("symlink {s}"));
    assert_kind(root.remove_file(p), want, &format!("remove_file {s}"));
    assert_kind(root.remove_dir(p), want, &format!("remove_dir {s}"));
    assert_kind(root.set_mode(p, 0o777), want, &format!("set_mode {s}"));
    assert_kind(root.set_mtime(p, ts(1, 0)), want, &format!("set_mtime {s}"));
    let t = root.create_temp().unwrap();
    t.file.write_all_at(b"pwned", 0).unwrap();
    assert_kind(
        commit(root, t, p, 0o777, ts(1, 0)),
        want,
        &format!("commit_temp {s}"),
    );
    let t = root.create_temp().unwrap();
    assert_kind(
        root.commit_temp_new(t, p, 0o777, ts(1, 0)),
        want,
        &format!("commit_temp_new {s}"),
    );
    // What deletions and replacements do: keep the old entry in the trash, put a symlink or
    // a hard link in its place, grow a file in place.
    assert_kind(root.trash_remove(p), want, &format!("trash_remove {s}"));
    assert_kind(root.trash_link(p), want, &format!("trash_link {s}"));
    assert_kind(
        replace_with_symlink(root, p, b"y"),
        want,
        &format!("replace_with_symlink {s}"),
    );
    assert_kind(
        root.append_in_place(
            p,
            |_| true,
            |f| f.write_all_at(b"pwned", 0),
            0o777,
            ts(1, 0),
        ),
        want,
        &format!("append_in_place {s}"),
    );
    // A hard link from a file made inside the share for the purpose (and removed after).
    let inside = rp(b"inside-link-source");
    let root_mtime = root.stat(&RelPath::root()).unwrap().unwrap().mtime;
    let t = root.create_temp().unwrap();
    root.commit_temp_new(t, &inside, 0o644, ts(1, 0)).unwrap();
    let (_, st) = root.open_file(&inside).unwrap();
    let id = vmsync_engine::index::Identity::of(&st);
    assert_kind(
        root.link_over(&inside, &id, p, &id),
        want,
        &format!("link_over {s}"),
    );
    root.remove_file(&inside).unwrap();
    root.set_mtime(&RelPath::root(), root_mtime).unwrap();
}

#[test]
fn escaping_symlinks_are_never_routes() {
    for resolver in RESOLVERS {
        for kind in ["relative", "absolute", "dot"] {
            let fx = Fixture::new();
            let target = match kind {
                "relative" => b"../OUT".to_vec(),
                "absolute" => fx.out.clone().into_os_string().into_vec(),
                _ => b".".to_vec(),
            };
            fs::write(fx.share.join("x"), b"inside x").unwrap();
            fs::create_dir(fx.share.join("sub")).unwrap();
            fs::write(fx.share.join("sub/x"), b"inside sub/x").unwrap();
            symlink(os(&target), fx.share.join("d")).unwrap();
            let root = fx.root(resolver);
            let inside = snapshot(&fx.share);
            for p in [
                &b"d/x"[..],
                b"d/sub/x",
                b"d/sub",
                b"d/new",
                b"d/sub/new",
                b"d/fifo",
            ] {
                every_op_refused(&root, &rp(p), FsErrorKind::Symlink);
            }
            // The link itself: seen as a symlink, never entered.
            let d = rp(b"d");
            assert_eq!(root.stat(&d).unwrap().unwrap().kind, FileKind::Symlink);
            assert_eq!(root.read_link(&d).unwrap(), target);
            assert_kind(root.open_dir(&d), FsErrorKind::Symlink, "open_dir d");
            assert_kind(root.open_file(&d), FsErrorKind::Symlink, "open_file d");
            assert_kind(root.set_mode(&d, 0o777), FsErrorKind::Symlink, "set_mode d");
            assert_kind(root.mkdir(&d, 0o777), FsErrorKind::Exists, "mkdir d");
            assert_kind(
                root.remove_dir(&d),
                FsErrorKind::NotADirectory,
                "remove_dir d",
            );
            let dh = root.open_dir(&RelPath::root()).unwrap();
            assert_kind(dh.open_subdir(b"d"), FsErrorKind::Symlink, "open_subdir d");
            assert_kind(
                dh.open_file(b"d"),
                FsErrorKind::Symlink,
                "DirHandle::open_file d",
            );
            let listed: Vec<_> = dh.entries().unwrap();
            assert!(listed
                .iter()
                .any(|(n, s)| n == b"d" && s.kind == FileKind::Symlink));
            assert_eq!(
                snapshot(&fx.share),
                inside,
                "share changed ({target:?}, {resolver:?})"
            );
            assert_eq!(fx.tmp_entries(), 0, "a refused commit left its temp behind");
            // Removing the link removes the link only.
            root.remove_file(&d).unwrap();
            assert!(fs::symlink_metadata(fx.share.join("d")).is_err());
            fx.assert_out_untouched();
        }
    }
}

#[test]
fn link_chains_loops_and_magic_links() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let s = &fx.share;
        fs::create_dir(s.join("a")).unwrap();
        // A chain that looks inside at every step but ends outside.
        symlink("c2", s.join("a/c1")).unwrap();
        symlink("../../OUT", s.join("a/c2")).unwrap();
        symlink("l2", s.join("l1")).unwrap();
        symlink("l1", s.join("l2")).unwrap();
        symlink("self", s.join("self")).unwrap();
        for i in 0..40 {
            let next = if i == 39 {
                "../OUT".to_string()
            } else {
                format!("k{}", i + 1)
            };
            symlink(next, s.join(format!("k{i}"))).unwrap();
        }
        symlink("/proc/self/root", s.join("proc")).unwrap();
        symlink("/proc/self/cwd", s.join("cwd")).unwrap();
        let root = fx.root(resolver);
        for link in [
            &b"a/c1"[..],
            b"a/c2",
            b"l1",
            b"l2",
            b"self",
            b"k0",
            b"k39",
            b"proc",
            b"cwd",
        ] {
            let l = rp(link);
            assert_eq!(root.stat(&l).unwrap().unwrap().kind, FileKind::Symlink);
            for under in [&b"x"[..], b"sub/x", b"tmp", b"new"] {
                let mut p = link.to_vec();
                p.push(b'/');
                p.extend_from_slice(under);
                every_op_refused(&root, &rp(&p), FsErrorKind::Symlink);
            }
        }
        assert_eq!(root.read_link(&rp(b"proc")).unwrap(), b"/proc/self/root");
        assert!(symlink_target_is_contained(&rp(b"a/c1"), b"c2"));
        assert!(!symlink_target_is_contained(&rp(b"a/c2"), b"../../OUT"));
        assert!(!symlink_target_is_contained(
            &rp(b"proc"),
            b"/proc/self/root"
        ));
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

#[test]
fn fifos_and_sockets_never_block_and_are_never_opened() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        mkfifo(&fx.share.join("f"));
        let _sock = std::os::unix::net::UnixListener::bind(fx.share.join("sock")).unwrap();
        let root = fx.root(resolver);
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let f = rp(b"f");
            let sock = rp(b"sock");
            assert_eq!(root.stat(&f).unwrap().unwrap().kind, FileKind::Other);
            assert_eq!(root.stat(&sock).unwrap().unwrap().kind, FileKind::Other);
            assert_kind(root.open_file(&f), FsErrorKind::NotAFile, "open_file fifo");
            assert_kind(
                root.open_file(&sock),
                FsErrorKind::NotAFile,
                "open_file socket",
            );
            let dh = root.open_dir(&RelPath::root()).unwrap();
            assert_kind(
                dh.open_file(b"f"),
                FsErrorKind::NotAFile,
                "DirHandle::open_file fifo",
            );
            assert_kind(
                root.set_mode(&f, 0o777),
                FsErrorKind::NotAFile,
                "set_mode fifo",
            );
            // A special file is something we never saw: never replaced by a commit.
            let t = root.create_temp().unwrap();
            assert_kind(
                commit(&root, t, &f, 0o644, ts(1, 0)),
                FsErrorKind::NotAFile,
                "commit over fifo",
            );
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("an operation on a FIFO blocked");
        worker.join().unwrap();
        assert!(fs::symlink_metadata(fx.share.join("f"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

/// Device nodes are special files like a FIFO: a character device with `/dev/zero`'s numbers
/// (reading it never ends) is seen as another kind, never opened, and never replaced by a
/// commit. Needs the right to make device nodes (root); skipped without it.
#[test]
fn device_nodes_are_never_opened_or_replaced() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let made = rustix::fs::mknodat(
            rustix::fs::CWD,
            fx.share.join("zero"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 5),
        );
        if let Err(e) = made {
            eprintln!("skipped: cannot make a device node here: {e}");
            return;
        }
        let made_mode = fs::symlink_metadata(fx.share.join("zero")).unwrap().mode();
        let root = fx.root(resolver);
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let dev = rp(b"zero");
            assert_eq!(root.stat(&dev).unwrap().unwrap().kind, FileKind::Other);
            assert_kind(
                root.open_file(&dev),
                FsErrorKind::NotAFile,
                "open_file device",
            );
            let dh = root.open_dir(&RelPath::root()).unwrap();
            assert_kind(
                dh.open_file(b"zero"),
                FsErrorKind::NotAFile,
                "DirHandle::open_file device",
            );
            assert_kind(
                root.set_mode(&dev, 0o600),
                FsErrorKind::NotAFile,
                "set_mode device",
            );
            let t = root.create_temp().unwrap();
            assert_kind(
                commit(&root, t, &dev, 0o644, ts(1, 0)),
                FsErrorKind::NotAFile,
                "commit over a device",
            );
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("an operation on a device node blocked");
        worker.join().unwrap();
        let m = fs::symlink_metadata(fx.share.join("zero")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.mode(), made_mode, "its mode is untouched");
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

#[test]
fn hardlink_to_outside_file_is_replaced_not_written_through() {
    for resolver in RESOLVERS {
        let mut fx = Fixture::new();
        fs::hard_link(fx.out.join("secret"), fx.share.join("h")).unwrap();
        fs::hard_link(fx.out.join("x"), fx.share.join("h2")).unwrap();
        fx.reseal();
        let outside_ino = fs::metadata(fx.out.join("secret")).unwrap().ino();
        let root = fx.root(resolver);
        let h = rp(b"h");
        assert_eq!(root.stat(&h).unwrap().unwrap().nlink, 2);
        let t = root.create_temp().unwrap();
        t.file.write_all_at(b"new content", 0).unwrap();
        let st = commit(&root, t, &h, 0o644, ts(1_000_000, 0)).unwrap();
        assert_ne!(st.ino, outside_ino);
        assert_eq!(st.nlink, 1);
        assert_eq!(fs::read(fx.share.join("h")).unwrap(), b"new content");
        root.remove_file(&rp(b"h2")).unwrap();
        fx.assert_out_untouched();
        assert_eq!(fs::read(fx.out.join("secret")).unwrap(), b"secret");
    }
}

#[test]
fn odd_names_are_just_bytes() {
    let names: [&[u8]; 6] = [
        b"new\nline",
        b"back\\slash",
        b"\xff\xfe",
        b"\x1b[31mred",
        b" lead",
        b"-dash",
    ];
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        for name in names {
            let dir = rp(name);
            root.mkdir(&dir, 0o755).unwrap();
            let file = dir.join(name).unwrap();
            let t = root.create_temp().unwrap();
            t.file.write_all_at(name, 0).unwrap();
            commit(&root, t, &file, 0o644, ts(5, 6)).unwrap();
            let link = dir.join(b"link").unwrap();
            root.symlink(&link, name).unwrap();
            assert_eq!(root.stat(&file).unwrap().unwrap().kind, FileKind::File);
            let (f, _) = root.open_file(&file).unwrap();
            let mut buf = vec![0; name.len()];
            f.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(buf, name);
            assert_eq!(root.read_link(&link).unwrap(), name);
            let on_disk = fx.share.join(os(name)).join(os(name));
            assert_eq!(fs::read(&on_disk).unwrap(), name);
            let dh = root.open_dir(&dir).unwrap();
            let listed: Vec<Vec<u8>> = dh.entries().unwrap().into_iter().map(|(n, _)| n).collect();
            let mut want = vec![b"link".to_vec(), name.to_vec()];
            want.sort();
            assert_eq!(listed, want);
        }
        let listed: Vec<Vec<u8>> = root
            .open_dir(&RelPath::root())
            .unwrap()
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut want: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
        want.sort();
        assert_eq!(listed, want);
        for name in names {
            let dir = rp(name);
            root.remove_file(&dir.join(name).unwrap()).unwrap();
            root.remove_file(&dir.join(b"link").unwrap()).unwrap();
            root.remove_dir(&dir).unwrap();
        }
        fx.assert_out_untouched();
    }
}

#[test]
fn modes_are_permission_bits_only_and_ignore_the_umask() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        let disk = |p: &[u8]| fs::symlink_metadata(fx.share.join(os(p))).unwrap().mode() & 0o7777;
        root.mkdir(&rp(b"suid"), 0o4755).unwrap();
        assert_eq!(disk(b"suid"), 0o755);
        root.mkdir(&rp(b"open"), 0o777).unwrap();
        assert_eq!(disk(b"open"), 0o777, "the umask must not apply");
        root.mkdir(&rp(b"closed"), 0o000).unwrap();
        assert_eq!(disk(b"closed"), 0o000);
        root.set_mode(&rp(b"closed"), 0o1777).unwrap();
        assert_eq!(disk(b"closed"), 0o777);
        let t = root.create_temp().unwrap();
        let st = commit(&root, t, &rp(b"f"), 0o4755, ts(1, 0)).unwrap();
        assert_eq!(st.mode, 0o755);
        assert_eq!(disk(b"f"), 0o755);
        let t = root.create_temp().unwrap();
        commit(&root, t, &rp(b"g"), 0o6777, ts(1, 0)).unwrap();
        assert_eq!(disk(b"g"), 0o777);
        root.set_mode(&rp(b"g"), 0o7000).unwrap();
        assert_eq!(disk(b"g"), 0o000);
        // Opening up a file nobody may read (as non-root this takes the pinned-fd path).
        root.set_mode(&rp(b"g"), 0o644).unwrap();
        assert_eq!(disk(b"g"), 0o644);
        // Existing setuid bits are reported in full, so the caller can see and sanitise them.
        fs::set_permissions(fx.share.join("g"), fs::Permissions::from_mode(0o4755)).unwrap();
        let st = root.stat(&rp(b"g")).unwrap().unwrap();
        assert_eq!((st.mode, st.perm()), (0o4755, 0o755));
        assert_eq!(
            root.stat(&rp(b"open")).unwrap().unwrap().kind,
            FileKind::Dir
        );
        // The reserved directories are owner-only.
        for p in [".vmsync", ".vmsync/tmp"] {
            assert_eq!(
                fs::metadata(fx.share.join(p)).unwrap().mode() & 0o7777,
                0o700,
                "{p}"
            );
        }
        fx.assert_out_untouched();
    }
}

#[test]
fn symlink_creation_checks_containment() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        root.mkdir(&rp(b"a"), 0o755).unwrap();
        for (link, target) in [
            (&b"a/up"[..], &b"../../OUT/x"[..]),
            (b"top", b"../OUT"),
            (b"a/deep", b"../../x"),
            (b"abs", b"/etc/passwd"),
            (b"empty", b""),
            (b"a/sneak", b"b/../../../OUT"),
            (b"marker", b".vmsync/id"),
        ] {
            let what = format!(
                "symlink {:?} -> {:?}",
                rp(link),
                String::from_utf8_lossy(target)
            );
            assert_kind(root.symlink(&rp(link), target), FsErrorKind::Symlink, &what);
            assert!(fs::symlink_metadata(fx.share.join(os(link))).is_err());
        }
        root.symlink(&rp(b"a/ok"), b"../x").unwrap();
        // Lexically inside (share/OUT, not the OUT beside the share).
        root.symlink(&rp(b"a/in"), b"../OUT/x").unwrap();
        root.symlink(&rp(b"a/dot"), b".").unwrap();
        assert_eq!(
            fs::read_link(fx.share.join("a/ok")).unwrap(),
            Path::new("../x")
        );
        assert_kind(
            root.symlink(&rp(b"a/ok"), b"y"),
            FsErrorKind::Exists,
            "symlink over existing",
        );
        fx.assert_out_untouched();
    }
}

#[test]
fn opening_the_root_classifies_failures() {
    let fx = Fixture::new();
    let base = fx.share.parent().unwrap().to_path_buf();
    assert_kind(
        ShareRoot::open(&base.join("missing")),
        FsErrorKind::NotFound,
        "missing root",
    );
    fs::write(base.join("file"), b"").unwrap();
    assert_kind(
        ShareRoot::open(&base.join("file")),
        FsErrorKind::NotADirectory,
        "file root",
    );
    symlink("share", base.join("linkroot")).unwrap();
    assert_kind(
        ShareRoot::open(&base.join("linkroot")),
        FsErrorKind::Symlink,
        "symlink root",
    );
    assert_kind(
        ShareRoot::probe(&base.join("linkroot")),
        FsErrorKind::Symlink,
        "symlink probe",
    );
    symlink("nowhere", base.join("dangling")).unwrap();
    assert_kind(
        ShareRoot::open(&base.join("dangling")),
        FsErrorKind::Symlink,
        "dangling root",
    );
    assert!(
        fs::symlink_metadata(fx.share.join(".vmsync")).is_err(),
        "probe/refusal created files"
    );
    // A symlink higher up the configured path is the admin's business, not the share's.
    symlink(".", base.join("here")).unwrap();
    let root = ShareRoot::open(&base.join("here/share")).unwrap();
    assert_eq!(ShareRoot::probe(&fx.share).unwrap(), root.dev_ino());
    fx.assert_out_untouched();
}

#[test]
fn a_replaced_root_is_detected_and_the_old_fd_stays_confined() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        root.write_marker([7; 16]).unwrap();
        let old = fx.share.with_file_name("share.old");
        fs::rename(&fx.share, &old).unwrap();
        symlink("OUT", &fx.share).unwrap();
        assert_kind(
            ShareRoot::probe(&fx.share),
            FsErrorKind::Symlink,
            "probe after swap",
        );
        assert_kind(
            ShareRoot::open_with(&fx.share, resolver),
            FsErrorKind::Symlink,
            "reopen",
        );
        // The open root keeps working on the original directory, never on the new path.
        let t = root.create_temp().unwrap();
        t.file.write_all_at(b"still inside", 0).unwrap();
        commit(&root, t, &rp(b"x"), 0o644, ts(1, 0)).unwrap();
        root.mkdir(&rp(b"sub"), 0o755).unwrap();
        assert_eq!(fs::read(old.join("x")).unwrap(), b"still inside");
        fx.assert_out_untouched();
        // Replaced by an empty directory: a different identity, and no marker.
        fs::remove_file(&fx.share).unwrap();
        fs::create_dir(&fx.share).unwrap();
        assert_ne!(ShareRoot::probe(&fx.share).unwrap(), root.dev_ino());
        let fresh = fx.root(resolver);
        assert_eq!(fresh.read_marker().unwrap(), None);
        assert_eq!(ShareRoot::probe(&old).unwrap(), root.dev_ino());
        assert_eq!(root.read_marker().unwrap(), Some([7; 16]));
    }
}

#[test]
fn clean_temps_removes_leftovers() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        for _ in 0..3 {
            let t = root.create_temp().unwrap();
            t.file.write_all_at(b"partial", 0).unwrap();
            drop(t); // as if the process had died mid-transfer
        }
        let tmp = fx.share.join(".vmsync/tmp");
        fs::write(tmp.join("junk"), b"").unwrap();
        fs::create_dir(tmp.join("emptydir")).unwrap();
        fs::create_dir_all(tmp.join("full/x")).unwrap();
        symlink("../../../OUT", tmp.join("escape")).unwrap();
        assert_eq!(fx.tmp_entries(), 7);
        assert_eq!(root.clean_temps().unwrap(), 6);
        let left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("full")]);
        assert_eq!(root.clean_temps().unwrap(), 0);
        let t = root.create_temp().unwrap();
        assert!(t.name().starts_with("t."));
        root.discard_temp(t);
        assert_eq!(fx.tmp_entries(), 1);
        fx.assert_out_untouched();
    }
}

#[test]
fn commit_temp_sets_mode_and_mtime_to_the_nanosecond() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        root.mkdir(&rp(b"d"), 0o755).unwrap();
        let p = rp(b"d/f");
        let t = root.create_temp().unwrap();
        t.file.write_all_at(b"hello", 0).unwrap();
        let mtime = ts(1_234_567_890, 123_456_789);
        let st = commit(&root, t, &p, 0o640, mtime).unwrap();
        let m = fs::symlink_metadata(fx.share.join("d/f")).unwrap();
        assert_eq!(st.kind, FileKind::File);
        assert_eq!(st.mtime, mtime);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 123_456_789));
        assert_eq!(st.mode, 0o640);
        assert_eq!(st.size, 5);
        assert_eq!((st.dev, st.ino), (m.dev(), m.ino()));
        assert_eq!(
            st.ctime,
            ts(m.ctime(), u32::try_from(m.ctime_nsec()).unwrap())
        );
        assert_eq!(root.stat(&p).unwrap(), Some(st));
        // Replacing keeps the rules; a pre-epoch mtime is fine.
        let t = root.create_temp().unwrap();
        let st2 = commit(&root, t, &p, 0o600, ts(-86_400, 1)).unwrap();
        assert_ne!(st2.ino, st.ino);
        assert_eq!((st2.mtime, st2.mode, st2.size), (ts(-86_400, 1), 0o600, 0));
        // set_mtime on a file, a directory and a symlink (the link itself, not its target).
        root.set_mtime(&p, ts(42, 999_999_999)).unwrap();
        assert_eq!(root.stat(&p).unwrap().unwrap().mtime, ts(42, 999_999_999));
        root.set_mtime(&rp(b"d"), ts(43, 1)).unwrap();
        assert_eq!(root.stat(&rp(b"d")).unwrap().unwrap().mtime, ts(43, 1));
        root.symlink(&rp(b"l"), b"d/f").unwrap();
        root.set_mtime(&rp(b"l"), ts(44, 2)).unwrap();
        assert_eq!(root.stat(&rp(b"l")).unwrap().unwrap().mtime, ts(44, 2));
        assert_eq!(root.stat(&p).unwrap().unwrap().mtime, ts(42, 999_999_999));
        // Out-of-range nanoseconds: refused, and the temp is gone.
        let t = root.create_temp().unwrap();
        assert_kind(
            commit(&root, t, &rp(b"bad"), 0o644, ts(1, 1_000_000_000)),
            FsErrorKind::Io,
            "bad nanos",
        );
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

#[test]
fn commit_refuses_directories_and_commit_new_refuses_anything() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        root.mkdir(&rp(b"dir"), 0o755).unwrap();
        let t = root.create_temp().unwrap();
        assert_kind(
            commit(&root, t, &rp(b"dir"), 0o644, ts(1, 0)),
            FsErrorKind::NotAFile,
            "commit over dir",
        );
        assert!(fs::metadata(fx.share.join("dir")).unwrap().is_dir());
        fs::write(fx.share.join("f"), b"local edit").unwrap();
        let t = root.create_temp().unwrap();
        assert_kind(
            root.commit_temp_new(t, &rp(b"f"), 0o644, ts(1, 0)),
            FsErrorKind::Exists,
            "commit_new over file",
        );
        assert_eq!(fs::read(fx.share.join("f")).unwrap(), b"local edit");
        let t = root.create_temp().unwrap();
        root.commit_temp_new(t, &rp(b"g"), 0o644, ts(1, 0)).unwrap();
        // Over a symlink to OUT: the link is replaced, OUT is not written.
        symlink("../OUT/x", fx.share.join("l")).unwrap();
        let t = root.create_temp().unwrap();
        t.file.write_all_at(b"replaced", 0).unwrap();
        commit(&root, t, &rp(b"l"), 0o644, ts(1, 0)).unwrap();
        assert!(fs::symlink_metadata(fx.share.join("l")).unwrap().is_file());
        // Missing parent, parent that is a file.
        let t = root.create_temp().unwrap();
        assert_kind(
            commit(&root, t, &rp(b"nope/f"), 0o644, ts(1, 0)),
            FsErrorKind::NotFound,
            "missing parent",
        );
        let t = root.create_temp().unwrap();
        assert_kind(
            commit(&root, t, &rp(b"f/x"), 0o644, ts(1, 0)),
            FsErrorKind::NotADirectory,
            "file parent",
        );
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

#[test]
fn removal_semantics() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        root.mkdir(&rp(b"d"), 0o755).unwrap();
        root.mkdir(&rp(b"d/e"), 0o755).unwrap();
        let t = root.create_temp().unwrap();
        commit(&root, t, &rp(b"f"), 0o644, ts(1, 0)).unwrap();
        symlink("d", fx.share.join("ld")).unwrap();
        symlink("../OUT/secret", fx.share.join("ls")).unwrap();
        assert_kind(
            root.remove_dir(&rp(b"d")),
            FsErrorKind::NotEmpty,
            "remove_dir non-empty",
        );
        assert_kind(
            root.remove_dir(&rp(b"f")),
            FsErrorKind::NotADirectory,
            "remove_dir file",
        );
        assert_kind(
            root.remove_dir(&rp(b"ld")),
            FsErrorKind::NotADirectory,
            "remove_dir symlink",
        );
        assert_kind(
            root.remove_file(&rp(b"d")),
            FsErrorKind::NotAFile,
            "remove_file dir",
        );
        assert_kind(
            root.remove_file(&rp(b"missing")),
            FsErrorKind::NotFound,
            "remove_file missing",
        );
        assert_kind(
            root.remove_dir(&rp(b"missing/x")),
            FsErrorKind::NotFound,
            "remove_dir missing parent",
        );
        assert_kind(
            root.remove_file(&RelPath::root()),
            FsErrorKind::Io,
            "remove_file root",
        );
        root.remove_file(&rp(b"ls")).unwrap();
        root.remove_file(&rp(b"ld")).unwrap();
        assert!(fs::metadata(fx.share.join("d/e")).unwrap().is_dir());
        root.remove_dir(&rp(b"d/e")).unwrap();
        root.remove_dir(&rp(b"d")).unwrap();
        root.remove_file(&rp(b"f")).unwrap();
        assert_eq!(
            root.open_dir(&RelPath::root()).unwrap().entries().unwrap(),
            vec![]
        );
        fx.assert_out_untouched();
    }
}

#[test]
fn stat_semantics() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        fs::write(fx.share.join("f"), b"12345").unwrap();
        assert_eq!(root.stat(&rp(b"missing")).unwrap(), None);
        assert_eq!(root.stat(&rp(b"missing/deeper/x")).unwrap(), None);
        assert_eq!(
            root.stat(&rp(b"f/x")).unwrap(),
            None,
            "a file as parent: cannot exist"
        );
        let st = root.stat(&rp(b"f")).unwrap().unwrap();
        assert_eq!((st.kind, st.size, st.nlink), (FileKind::File, 5, 1));
        let r = root.stat(&RelPath::root()).unwrap().unwrap();
        assert_eq!(r.kind, FileKind::Dir);
        assert_eq!((r.dev, r.ino), root.dev_ino());
        let dh = root.open_dir(&RelPath::root()).unwrap();
        assert_eq!(dh.stat().unwrap(), r);
        // The root's own metadata can be set too (through its fd, not its path).
        root.set_mode(&RelPath::root(), 0o750).unwrap();
        root.set_mtime(&RelPath::root(), ts(77, 7)).unwrap();
        let r = root.stat(&RelPath::root()).unwrap().unwrap();
        assert_eq!((r.mode, r.mtime), (0o750, ts(77, 7)));
        assert_eq!(dh.stat_entry(b"f").unwrap(), Some(st));
        assert_eq!(dh.stat_entry(b"nope").unwrap(), None);
        let (file, fst) = root.open_file(&rp(b"f")).unwrap();
        assert_eq!(fst, st);
        assert_eq!(file.metadata().unwrap().ino(), st.ino);
        fx.assert_out_untouched();
    }
}

#[test]
fn root_listing_hides_the_reserved_directory() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        for name in [&b"b"[..], b"B", b"\xff", b"a"] {
            fs::write(fx.share.join(os(name)), b"").unwrap();
        }
        fs::create_dir_all(fx.share.join("sub/.vmsync")).unwrap();
        let dh = root.open_dir(&RelPath::root()).unwrap();
        let names: Vec<Vec<u8>> = dh.entries().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            vec![
                b"B".to_vec(),
                b"a".to_vec(),
                b"b".to_vec(),
                b"sub".to_vec(),
                b"\xff".to_vec()
            ]
        );
        assert_kind(
            dh.open_subdir(b".vmsync"),
            FsErrorKind::Io,
            "open_subdir .vmsync",
        );
        assert_kind(
            dh.open_file(b".vmsync"),
            FsErrorKind::Io,
            "open_file .vmsync",
        );
        for bad in [&b"sub/.vmsync"[..], b"..", b".", b"", b"a\0b"] {
            assert_kind(dh.open_subdir(bad), FsErrorKind::Io, "bad name");
            assert_kind(dh.read_link(bad), FsErrorKind::Io, "bad name");
        }
        let sub = dh.open_subdir(b"sub").unwrap();
        let names: Vec<Vec<u8>> = sub.entries().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            vec![b".vmsync".to_vec()],
            "only the root's .vmsync is reserved"
        );
        assert_eq!(
            sub.open_subdir(b".vmsync").unwrap().entries().unwrap(),
            vec![]
        );
        fx.assert_out_untouched();
    }
}

#[test]
fn marker_round_trip_and_hostile_markers() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        assert_eq!(root.read_marker().unwrap(), None);
        let id = *b"0123456789abcdef";
        root.write_marker(id).unwrap();
        assert_eq!(root.read_marker().unwrap(), Some(id));
        let text = fs::read_to_string(fx.share.join(".vmsync/id")).unwrap();
        assert_eq!(text, "30313233343536373839616263646566\n");
        root.write_marker([0xab; 16]).unwrap();
        assert_eq!(root.read_marker().unwrap(), Some([0xab; 16]));
        fs::write(fx.share.join(".vmsync/id"), b"not a marker").unwrap();
        assert_kind(root.read_marker(), FsErrorKind::Io, "corrupt marker");
        fs::remove_file(fx.share.join(".vmsync/id")).unwrap();
        symlink("../../OUT/x", fx.share.join(".vmsync/id")).unwrap();
        assert_kind(root.read_marker(), FsErrorKind::Symlink, "marker symlink");
        root.write_marker(id).unwrap();
        assert!(fs::symlink_metadata(fx.share.join(".vmsync/id"))
            .unwrap()
            .is_file());
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

#[test]
fn reserved_directories_that_are_symlinks_are_refused() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        symlink("../OUT", fx.share.join(".vmsync")).unwrap();
        assert_kind(
            ShareRoot::open_with(&fx.share, resolver),
            FsErrorKind::Symlink,
            ".vmsync symlink",
        );
        fs::remove_file(fx.share.join(".vmsync")).unwrap();
        fs::create_dir(fx.share.join(".vmsync")).unwrap();
        symlink("../../OUT/sub", fx.share.join(".vmsync/tmp")).unwrap();
        assert_kind(
            ShareRoot::open_with(&fx.share, resolver),
            FsErrorKind::Symlink,
            "tmp symlink",
        );
        fx.assert_out_untouched();
    }
}

/// A directory being swapped with a symlink to OUT in a loop while we write under it: every
/// operation either lands inside the share or is refused.
#[test]
fn racing_directory_symlink_swaps_never_reach_out() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        fs::create_dir(fx.share.join("d")).unwrap();
        symlink("../OUT", fx.share.join("swap")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let stop = stop.clone();
            let (d, swap) = (fx.share.join("d"), fx.share.join("swap"));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        &d,
                        rustix::fs::CWD,
                        &swap,
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                }
            })
        };
        let (mut landed, mut refused) = (0, 0);
        // Few iterations: each one fsyncs several times.
        for i in 0..300 {
            let name = format!("d/f{i}");
            let p = rp(name.as_bytes());
            let t = root.create_temp().unwrap();
            t.file.write_all_at(b"pwned", 0).unwrap();
            match commit(&root, t, &p, 0o777, ts(1, 0)) {
                Ok(_) => landed += 1,
                Err(e) => {
                    assert_eq!(e.kind(), FsErrorKind::Symlink, "{e}");
                    refused += 1;
                }
            }
            let _ = root.mkdir(&rp(format!("d/m{i}").as_bytes()), 0o777);
            let _ = root.set_mode(&rp(b"d/x"), 0o777);
            let _ = root.set_mtime(&rp(b"d/x"), ts(1, 0));
            let _ = root.remove_file(&rp(b"d/secret"));
            let _ = root.symlink(&rp(format!("d/s{i}").as_bytes()), b"y");
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(
            landed > 0 && refused > 0,
            "no race exercised: {landed} landed, {refused} refused"
        );
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

/// Mount points inside the share are not crossed. Needs the privilege to mount (skipped
/// otherwise).
#[test]
fn mount_points_are_not_crossed() {
    let mount = |args: &[&OsStr]| {
        std::process::Command::new("mount")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let (m, b) = (fx.share.join("m"), fx.share.join("b"));
        fs::create_dir(&m).unwrap();
        fs::create_dir(&b).unwrap();
        if !mount(&[
            OsStr::new("-t"),
            OsStr::new("tmpfs"),
            OsStr::new("none"),
            m.as_os_str(),
        ]) {
            eprintln!("skipping mount_points_are_not_crossed: cannot mount here");
            return;
        }
        let _um = Unmount(m.clone());
        assert!(
            mount(&[OsStr::new("--bind"), fx.out.as_os_str(), b.as_os_str()]),
            "bind mount"
        );
        let _ub = Unmount(b.clone());
        let root = fx.root(resolver);
        // A tmpfs: another device, reported as Other, never entered.
        assert_eq!(root.stat(&rp(b"m")).unwrap().unwrap().kind, FileKind::Other);
        let dh = root.open_dir(&RelPath::root()).unwrap();
        let kinds: Vec<_> = dh
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, s)| (n, s.kind))
            .collect();
        assert!(
            kinds.contains(&(b"m".to_vec(), FileKind::Other)),
            "{kinds:?}"
        );
        assert_kind(
            dh.open_subdir(b"m"),
            FsErrorKind::Symlink,
            "open_subdir tmpfs",
        );
        assert_kind(
            root.open_dir(&rp(b"m")),
            FsErrorKind::Symlink,
            "open_dir tmpfs",
        );
        every_op_refused(&root, &rp(b"m/x"), FsErrorKind::Symlink);
        // A bind mount of OUT: same device, still a mount, never entered.
        assert_kind(
            dh.open_subdir(b"b"),
            FsErrorKind::Symlink,
            "open_subdir bind mount",
        );
        every_op_refused(&root, &rp(b"b/x"), FsErrorKind::Symlink);
        every_op_refused(&root, &rp(b"b/sub/x"), FsErrorKind::Symlink);
        drop(_ub);
        drop(_um);
        fx.assert_out_untouched();
    }
}

/// A share on a filesystem that folds case is refused when it is opened, and the probe leaves
/// nothing behind. The filesystem is a FAT image mounted with `fusefat` (the kernel the tests
/// run on has neither vfat nor ext4 case folding): FUSE numbers each lookup's inode afresh, so
/// the probe must not compare inodes. Needs `mkfs.vfat` (dosfstools), `fusefat` and
/// `/dev/fuse`; `.ci/run` installs the tools, and under `CI=true` their absence fails.
#[test]
fn a_root_that_folds_case_is_refused() {
    use std::process::{Command, Stdio};
    let ci = std::env::var_os("CI").is_some_and(|v| v == "true");
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("mkfs.vfat") || !have("fusefat") {
        assert!(!ci, "CI installs dosfstools and fusefat: missing here");
        eprintln!("skipped: needs mkfs.vfat (dosfstools) and fusefat");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("fat.img");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let made = Command::new("mkfs.vfat")
        .arg(&image)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "mkfs.vfat");
    let mounted = Command::new("fusefat")
        .args(["-o", "rw+"])
        .arg(&image)
        .arg(&mnt)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        // Without the device FUSE cannot run at all; with it, a failed mount is a failure.
        assert!(
            !ci || !Path::new("/dev/fuse").exists(),
            "fusefat could not mount with /dev/fuse present"
        );
        eprintln!("skipped: fusefat could not mount (no FUSE here)");
        return;
    }
    let _um = Unmount(mnt.clone());
    let share = mnt.join("share");
    fs::create_dir(&share).unwrap();
    fs::write(share.join("Name.txt"), b"x").unwrap();
    // The filesystem folds case, and gives each lookup its own inode number.
    assert_eq!(fs::read(share.join("NAME.TXT")).unwrap(), b"x");
    for resolver in RESOLVERS {
        let err = ShareRoot::open_with(&share, resolver)
            .map(|_| ())
            .expect_err("a case-folding root must be refused");
        assert!(err.to_string().contains("folds case"), "{err}");
        let left: Vec<_> = fs::read_dir(share.join(".vmsync"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.as_bytes().to_ascii_lowercase().starts_with(b"case-probe"))
            .collect();
        assert!(left.is_empty(), "the probe stayed behind: {left:?}");
    }
    assert_eq!(fs::read(share.join("Name.txt")).unwrap(), b"x");
}

/// A share opens on a filesystem with no inode left (the case probe cannot make its file and
/// falls back to comparing inodes): a full disk must not stop a share from opening, which
/// every full scan does. A tmpfs with 64 inodes; needs the privilege to mount (skipped
/// otherwise).
#[test]
fn a_share_opens_when_no_file_can_be_made() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "nr_inodes=64,size=4m", "none"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount here");
        return;
    }
    let _um = Unmount(mnt.clone());
    let share = mnt.join("share");
    fs::create_dir(&share).unwrap();
    drop(ShareRoot::open(&share).unwrap());
    let mut made = 0;
    while fs::write(share.join(format!("f{made}")), b"x").is_ok() {
        made += 1;
        assert!(made < 1000, "the inode limit did not hold");
    }
    assert!(
        fs::write(share.join("one-more"), b"x").is_err(),
        "inodes left"
    );
    for resolver in RESOLVERS {
        ShareRoot::open_with(&share, resolver).expect("a share with no inode left must open");
    }
}

/// A new file's unnamed temp is linked straight in: never over anything (a file, a directory,
/// a symlink, a FIFO that appeared since), never through a symlinked parent, and without
/// leaving a name in `.vmsync/tmp/`.
#[test]
fn commit_new_links_an_unnamed_temp_and_replaces_nothing() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        root.mkdir(&rp(b"d"), 0o755).unwrap();
        fs::write(fx.share.join("d/f"), b"local edit").unwrap();
        root.mkdir(&rp(b"d/sub"), 0o755).unwrap();
        symlink("f", fx.share.join("d/l")).unwrap();
        mkfifo(&fx.share.join("d/p"));
        symlink("../OUT", fx.share.join("esc")).unwrap();
        for (name, want) in [
            (&b"d/f"[..], FsErrorKind::Exists),
            (b"d/sub", FsErrorKind::Exists),
            (b"d/l", FsErrorKind::Exists),
            (b"d/p", FsErrorKind::Exists),
            (b"esc/x", FsErrorKind::NotADirectory),
        ] {
            let t = root.create_temp_for(&rp(b"d/new")).unwrap();
            t.file.write_all_at(b"pwned", 0).unwrap();
            let shown = String::from_utf8_lossy(name).into_owned();
            let got = root.commit_temp_new(t, &rp(name), 0o644, ts(1, 0));
            assert!(got.is_err(), "{shown}: committed");
            if want != FsErrorKind::NotADirectory {
                assert_kind(got, want, &shown);
            }
        }
        assert_eq!(fs::read(fx.share.join("d/f")).unwrap(), b"local edit");
        assert!(fs::metadata(fx.share.join("d/sub")).unwrap().is_dir());
        assert_eq!(fs::read_link(fx.share.join("d/l")).unwrap(), Path::new("f"));
        let t = root.create_temp_for(&rp(b"d/new")).unwrap();
        assert_eq!(
            t.name(),
            "",
            "an O_TMPFILE temp (this test's filesystem has them)"
        );
        t.file.write_all_at(b"fresh", 0).unwrap();
        let st = root
            .commit_temp_new(t, &rp(b"d/new"), 0o640, ts(7, 5))
            .unwrap();
        let meta = fs::symlink_metadata(fx.share.join("d/new")).unwrap();
        assert_eq!(fs::read(fx.share.join("d/new")).unwrap(), b"fresh");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (7, 5));
        assert_eq!(st.ino, meta.ino());
        assert_eq!(fx.tmp_entries(), 0);
        fx.assert_out_untouched();
    }
}

/// A directory appears only with its final mode: it is made in the temp area and renamed into
/// place, so an agent killed part way leaves an owner-only leftover there (which `clean_temps`
/// removes), never a visible directory at 0700 that the next cycle would read as a conflict.
#[test]
fn mkdir_shows_a_directory_only_with_its_final_mode() {
    for resolver in RESOLVERS {
        let fx = Fixture::new();
        let root = fx.root(resolver);
        let disk = |p: &[u8]| fs::symlink_metadata(fx.share.join(os(p))).unwrap().mode() & 0o7777;
        for (name, mode) in [
            (&b"a"[..], 0o755),
            (b"b", 0o775),
            (b"c", 0o555),
            (b"d", 0o000),
        ] {
            root.mkdir(&rp(name), mode).unwrap();
            assert_eq!(disk(name), mode, "{}", String::from_utf8_lossy(name));
        }
        root.mkdir(&rp(b"a/inner"), 0o750).unwrap();
        assert_eq!(disk(b"a/inner"), 0o750);
        // Nothing is left in the temp area, also when the name is taken.
        assert_kind(
            root.mkdir(&rp(b"a"), 0o700),
            FsErrorKind::Exists,
            "mkdir a again",
        );
        fs::write(fx.share.join("file"), b"x").unwrap();
        assert_kind(
            root.mkdir(&rp(b"file"), 0o755),
            FsErrorKind::Exists,
            "mkdir over a file",
        );
        assert_eq!(fx.tmp_entries(), 0);
        assert_eq!(disk(b"a"), 0o755);
        assert_eq!(fs::read(fx.share.join("file")).unwrap(), b"x");
    }
}

/// A share that is a git repository: `git status` does not list vmsync's reserved directory,
/// because it ignores itself (`.vmsync/.gitignore`, `*`). One that is already there (even a
/// symlink out of the share, as a hostile peer cannot make but a user could) is left alone.
#[test]
fn the_reserved_directory_ignores_itself_for_git() {
    let fx = Fixture::new();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&fx.share)
            .output()
            .expect("git runs");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    git(&["init", "-q"]);
    fs::write(fx.share.join("tracked"), b"x").unwrap();
    git(&["add", "tracked"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "t",
    ]);
    let _root = fx.root(Resolver::Auto);
    assert_eq!(
        fs::read(fx.share.join(".vmsync/.gitignore")).unwrap(),
        b"*\n"
    );
    assert_eq!(
        git(&["status", "--porcelain"]),
        "",
        "git status lists something"
    );

    // An existing one is never replaced or followed.
    fs::remove_file(fx.share.join(".vmsync/.gitignore")).unwrap();
    symlink(fx.out.join("x"), fx.share.join(".vmsync/.gitignore")).unwrap();
    let _root = fx.root(Resolver::Walk);
    assert!(fs::symlink_metadata(fx.share.join(".vmsync/.gitignore"))
        .unwrap()
        .file_type()
        .is_symlink());
    fx.assert_out_untouched();
}
