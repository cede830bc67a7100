//! A cycle cut off part way (the destination's connection lost, or the host killed between two
//! batches of a big sync) must leave what already landed recorded in the ancestor. Otherwise
//! the next cycle reads a file it copied as the destination's own creation: the source's later
//! deletion of it brings it back, and the source's later edit of it is a conflict. The kill
//! loop (`tests/tests/kill_loop.rs`) found both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vmsync_core::endpoint::{Change, EndpointError, ScanScope};
use vmsync_engine::controller::Controller;
use vmsync_engine::local::LocalEndpoint;
use vmsync_tests::fixture::{assert_same_tree, local_pair, read, tree, write, PairOptions};
use vmsync_tests::intercept::{Hooks, Intercept, Transit};

/// How the transition numbered `at` (from 0) ends.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Cut {
    /// It fails, as a lost connection does.
    Error,
    /// It never answers; the test then drops the cycle, as `kill -9` of the host does.
    Hang,
    /// It lands, but its answer is lost (the guest killed right after applying it).
    LandThenError,
}

/// Hooks whose transitions stop at the `at`-th one.
struct CutAt {
    at: usize,
    cut: Cut,
    calls: Arc<AtomicUsize>,
}

impl Hooks for CutAt {
    fn transition(&mut self, _changes: &[Change]) -> Transit {
        let lost = || EndpointError::Io("connection lost".into());
        if self.calls.fetch_add(1, Ordering::SeqCst) != self.at {
            return Transit::Pass;
        }
        match self.cut {
            Cut::Error => Transit::Fail(lost()),
            Cut::Hang => Transit::Hang,
            Cut::LandThenError => Transit::LandThenFail(lost()),
        }
    }
}

struct Side {
    host: LocalEndpoint,
    guest: Intercept<LocalEndpoint, CutAt>,
    controller: Controller,
    calls: Arc<AtomicUsize>,
}

fn open(tmp: &std::path::Path, at: usize, cut: Cut) -> Side {
    let (host, guest, controller) = local_pair(tmp, &PairOptions::default());
    let calls = Arc::new(AtomicUsize::new(0));
    Side {
        host,
        guest: Intercept {
            inner: guest,
            hooks: CutAt {
                at,
                cut,
                calls: calls.clone(),
            },
        },
        controller,
        calls,
    }
}

/// 600 host files cross to the guest in batches; the third transition is cut off. Then the host
/// deletes one file and edits another of those that had landed. Cut by an error the same
/// controller goes on; cut by a hang the controller is dropped mid-cycle and reopened from its
/// database (the host agent killed and restarted); cut after the batch landed, its answer lost,
/// the next full scan finds it in place. Each way the next cycles carry the deletion and the
/// edit: no resurrection, no conflict.
#[tokio::test]
async fn a_cycle_cut_off_after_some_batches_keeps_what_landed_in_the_ancestor() {
    for cut in [Cut::Error, Cut::Hang, Cut::LandThenError] {
        let tmp = tempfile::tempdir().unwrap();
        let (h, g) = (tmp.path().join("host"), tmp.path().join("guest"));
        std::fs::create_dir_all(&g).unwrap();
        for i in 0..600 {
            write(
                &h,
                &format!("d{}/f{i:03}.txt", i % 5),
                format!("file {i}\n"),
            );
        }
        let mut s = open(tmp.path(), 2, cut);
        let cycle = s
            .controller
            .cycle(&mut s.host, &mut s.guest, ScanScope::Full);
        match cut {
            Cut::Error | Cut::LandThenError => {
                assert!(cycle.await.is_err(), "the cut must fail the cycle")
            }
            Cut::Hang => {
                let calls = s.calls.clone();
                tokio::select! {
                    _ = cycle => panic!("a hung transition cannot finish the cycle"),
                    _ = async {
                        while calls.load(Ordering::SeqCst) <= 2 {
                            tokio::task::yield_now().await;
                        }
                    } => {}
                }
                drop(s);
                s = open(tmp.path(), usize::MAX, Cut::Error);
            }
        }
        // Something landed, and not everything: the cut was part way.
        let landed: Vec<String> = tree(&g)
            .into_iter()
            .filter(|(p, _)| p.ends_with(b".txt"))
            .map(|(p, _)| String::from_utf8(p).unwrap())
            .collect();
        assert!(
            !landed.is_empty() && landed.len() < 600,
            "{cut:?}: {} files landed",
            landed.len()
        );
        // The last ones landed: with `LandThenError`, from the batch whose answer was lost.
        let (gone, edited) = (&landed[landed.len() - 1], &landed[landed.len() - 2]);
        std::fs::remove_file(h.join(gone)).unwrap();
        write(&h, edited, "edited on the host after the cut\n");
        s.guest.hooks.at = usize::MAX;
        for _ in 0..3 {
            let report = s
                .controller
                .cycle(&mut s.host, &mut s.guest, ScanScope::Full)
                .await
                .expect("cycle");
            assert_eq!(
                report.conflicts,
                0,
                "{cut:?}: a copied file became a conflict: {:?}",
                s.controller.status().lock().unwrap().conflicts
            );
            if !report.retry {
                break;
            }
        }
        assert!(
            !h.join(gone).exists() && !g.join(gone).exists(),
            "{cut:?}: the deleted {gone} came back"
        );
        assert_eq!(read(&g, edited), b"edited on the host after the cut\n");
        assert_same_tree(&h, &g);
        assert_eq!(
            tree(&g)
                .into_iter()
                .filter(|(p, _)| p.ends_with(b".txt"))
                .count(),
            599
        );
    }
}
