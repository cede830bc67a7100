//! Quotas: how much the guest may make the host's share hold (files, directories, bytes, the
//! largest file). A cycle whose plan would go past one pauses the share with `quota` before it
//! changes anything, on either side; the first cycle whose plan fits lifts the pause. In-process
//! pairs; the config keys are tested with the host's config parser.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vmsync_core::quota::Quota;
use vmsync_engine::controller::QUOTA_CODE;
use vmsync_engine::status::ShareState;
use vmsync_tests::fixture::{assert_same_tree, random_bytes, read, tree, write, Pair};

fn pair_with(quota: Quota) -> Pair {
    let mut p = Pair::new(Default::default());
    p.sides().controller.set_quota(quota);
    p
}

const NONE: Quota = Quota {
    bytes: None,
    files: None,
    dirs: None,
    file_bytes: None,
};

#[tokio::test]
async fn a_guest_pushing_past_the_file_quota_pauses_the_share_and_nothing_lands() {
    let mut p = pair_with(Quota {
        files: Some(5),
        ..NONE
    });
    for i in 0..3 {
        write(&p.host_dir, &format!("h{i}"), random_bytes(i, 100));
    }
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let before = tree(&p.host_dir);
    // Three more from the guest make six; a host edit waits with them.
    for i in 0..3 {
        write(&p.guest_dir, &format!("g{i}"), random_bytes(10 + i, 100));
    }
    write(&p.host_dir, "h0", random_bytes(99, 100));
    let host_now = tree(&p.host_dir);
    let report = p.sync().await;
    assert_eq!(report.pending, 1, "{report:?}");
    let status = p.status();
    assert_eq!(status.halt_code.as_deref(), Some(QUOTA_CODE));
    assert_eq!(status.state, ShareState::Halted);
    let reason = status.halt_reason.unwrap();
    assert!(reason.contains("6 files, over quota_files (5)"), "{reason}");
    assert_eq!(tree(&p.host_dir), host_now, "nothing of the guest's landed");
    assert_ne!(host_now, before);
    assert_eq!(
        read(&p.guest_dir, "h0"),
        random_bytes(0, 100),
        "the whole cycle waits: the host's edit too"
    );
    // A live edit elsewhere that fits goes through, and the share stays paused: the rest of
    // the guest's files still do not fit.
    write(&p.guest_dir, "h1", random_bytes(77, 100));
    let report = p.cycle_paths(&["h1"]).await;
    assert_eq!(report.pending, 1, "{report:?}");
    assert_eq!(read(&p.host_dir, "h1"), random_bytes(77, 100));
    assert_eq!(p.status().halt_code.as_deref(), Some(QUOTA_CODE));
    // The guest removes one: the plan fits (5 files) and everything goes through.
    std::fs::remove_file(p.guest_dir.join("g2")).unwrap();
    let report = p.sync().await;
    assert_eq!(report.pending, 0, "{report:?}");
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let status = p.status();
    assert_eq!(status.halt_code, None);
    assert_eq!(status.state, ShareState::InSync);
    assert_eq!(tree(&p.host_dir).len(), 5);
}

#[tokio::test]
async fn directories_bytes_and_the_largest_file_have_quotas_too() {
    // (quota, what the guest makes, what the reason says)
    type Case = (Quota, fn(&Pair), &'static str);
    let cases: Vec<Case> = vec![
        (
            Quota {
                dirs: Some(3),
                ..NONE
            },
            |p| {
                for i in 0..4 {
                    std::fs::create_dir(p.guest_dir.join(format!("d{i}"))).unwrap();
                }
            },
            "4 directories, over quota_dirs (3)",
        ),
        (
            Quota {
                bytes: Some(1000),
                ..NONE
            },
            |p| {
                write(&p.guest_dir, "a", random_bytes(1, 600));
                write(&p.guest_dir, "b", random_bytes(2, 600));
            },
            "(1200 bytes), over quota_bytes (1000 bytes)",
        ),
        (
            Quota {
                file_bytes: Some(10_000),
                ..NONE
            },
            |p| write(&p.guest_dir, "big.bin", random_bytes(3, 10_001)),
            "big.bin is 9.7 KiB (10001 bytes), larger than quota_file_bytes (10000 bytes)",
        ),
    ];
    for (quota, make, says) in cases {
        let mut p = pair_with(quota);
        make(&p);
        let report = p.sync().await;
        assert_eq!(report.pending, 1, "{says}: {report:?}");
        let status = p.status();
        assert_eq!(status.halt_code.as_deref(), Some(QUOTA_CODE), "{says}");
        let reason = status.halt_reason.unwrap();
        assert!(reason.contains(says), "{says}: {reason}");
        assert!(tree(&p.host_dir).is_empty(), "{says}: nothing landed");
        // Raised: the next cycle lifts the pause by itself.
        p.sides().controller.set_quota(NONE);
        p.sync().await;
        assert_same_tree(&p.host_dir, &p.guest_dir);
        assert_eq!(p.status().halt_code, None, "{says}");
    }
}

/// A share already over its quota (the host's own files) keeps syncing what does not add to
/// it: deletions, and the host's own changes.
#[tokio::test]
async fn a_share_already_over_its_quota_still_syncs_what_does_not_grow_it() {
    let mut p = pair_with(NONE);
    for i in 0..6 {
        write(&p.host_dir, &format!("f{i}"), random_bytes(i, 100));
    }
    p.sync().await;
    p.sides().controller.set_quota(Quota {
        files: Some(3),
        ..NONE
    });
    std::fs::remove_file(p.guest_dir.join("f0")).unwrap();
    write(&p.host_dir, "f1", random_bytes(50, 100));
    write(
        &p.host_dir,
        "new-on-host",
        "host files are the host's own business",
    );
    let report = p.sync().await;
    assert_eq!(report.pending, 0, "{report:?}");
    assert_eq!(p.status().halt_code, None);
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert!(!p.host_dir.join("f0").exists());
}
