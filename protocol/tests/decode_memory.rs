//! What a peer's message can cost the decoder in heap: a sequence longer than its bound is
//! refused from its length prefix, before any element is decoded, so a message of many tiny
//! elements (one-byte paths, one-byte outcomes) costs next to nothing however many it claims.
//! A counting allocator (this test binary's own) measures the peak heap of each decode.
#![allow(clippy::unwrap_used)]
// The counting allocator below implements `GlobalAlloc`, which is unsafe by nature; it only
// forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use vmsync_core::edits::ManifestEdit;
use vmsync_core::endpoint::{ChangeHints, Outcome, ScanScope};
use vmsync_core::limits::{MAX_BATCH_PATHS, MAX_FILE_CHUNKS, MAX_SCAN_IGNORED};
use vmsync_core::{ChunkRef, Hash, Manifest, RelPath};
use vmsync_protocol::limits::{MAX_BATCH_CHANGES, MAX_BATCH_CHUNKS};
use vmsync_protocol::messages::{ManifestForm, ScanDelta, StageFile, WireError};
use vmsync_protocol::{decode_message, Message, Request, RequestBody, Response, ResponseBody};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: allocated above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The peak heap above what was live before, while decoding `bytes`, and whether it decoded.
fn decode_peak(bytes: &[u8]) -> (usize, bool) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let ok = decode_message::<Message>(bytes).is_ok();
    (PEAK.load(Ordering::Relaxed) - before, ok)
}

fn paths(n: usize) -> Vec<RelPath> {
    (0..n)
        .map(|i| RelPath::from_bytes(&[b'a' + (i % 26) as u8]).unwrap())
        .collect()
}

fn request(body: RequestBody) -> Message {
    Message::Request(Request {
        id: 1,
        share: 0,
        body,
    })
}

fn response(body: ResponseBody) -> Message {
    Message::Response(Response { id: 1, body })
}

/// Each message holds one sequence just over its bound, of elements that are tiny on the wire
/// and larger in memory. Encoded without the sender's checks (postcard directly), as a hostile
/// peer would.
#[test]
fn a_sequence_over_its_bound_costs_no_heap_for_its_elements_and_within_it_decodes() {
    let cases: Vec<(&str, Message)> = vec![
        (
            "change hints",
            response(ResponseBody::Changes(Ok(ChangeHints {
                paths: paths(MAX_BATCH_PATHS + 1),
                rescan: false,
            }))),
        ),
        (
            "outcomes",
            response(ResponseBody::Transitioned(Ok(vec![
                Outcome::Applied;
                MAX_BATCH_CHANGES + 1
            ]))),
        ),
        (
            "chunks read",
            response(ResponseBody::Chunks(Ok(vec![None; MAX_BATCH_CHUNKS + 1]))),
        ),
        (
            "scan paths",
            request(RequestBody::Scan {
                scope: ScanScope::Paths(paths(MAX_BATCH_PATHS + 1)),
                options: Default::default(),
            }),
        ),
        (
            "ignored paths in a scan delta",
            response(ResponseBody::ScanDelta(Ok(ScanDelta {
                token: 1,
                base: None,
                root: None,
                changed: vec![],
                removed: vec![],
                problems: vec![],
                ignored: paths(MAX_SCAN_IGNORED + 1),
                generation: None,
            }))),
        ),
        (
            "manifest edits",
            request(RequestBody::Stage {
                files: vec![StageFile {
                    path: paths(1).remove(0),
                    meta: vmsync_core::FileMeta {
                        size: 1,
                        mode: 0o644,
                        mtime: Default::default(),
                        digest: Hash([0; 32]),
                    },
                    manifest: ManifestForm::Edits {
                        base_size: 1,
                        base_digest: Hash([0; 32]),
                        edits: vec![ManifestEdit::Copy { start: 0, count: 1 }; MAX_FILE_CHUNKS + 1],
                    },
                }],
            }),
        ),
        (
            "a manifest's own chunk list",
            response(ResponseBody::Manifests(Ok(vec![Ok(Manifest {
                chunks: vec![
                    ChunkRef {
                        hash: Hash([7; 32]),
                        offset: 0,
                        len: 1,
                    };
                    MAX_FILE_CHUNKS + 1
                ],
                links: vec![],
            })]))),
        ),
    ];
    for (what, message) in cases {
        let bytes = postcard::to_allocvec(&message).unwrap();
        drop(message);
        let (peak, ok) = decode_peak(&bytes);
        assert!(!ok, "{what}: decoded");
        // Up to the bound, a sequence reserves at most 64 KiB up front; the rest is the
        // decoder's own small change.
        assert!(
            peak <= 80 * 1024,
            "{what}: {peak} bytes of heap to refuse a {}-byte message",
            bytes.len()
        );
    }
    // Within its bound the same shape decodes and costs what it holds: the measure is not
    // vacuous. (One test: the counters are the whole process's.)
    let message = response(ResponseBody::Changes(Ok(ChangeHints {
        paths: paths(MAX_BATCH_PATHS),
        rescan: false,
    })));
    let bytes = postcard::to_allocvec(&message).unwrap();
    drop(message);
    let (peak, ok) = decode_peak(&bytes);
    assert!(ok);
    assert!(
        peak >= MAX_BATCH_PATHS * std::mem::size_of::<RelPath>(),
        "{peak} bytes for {MAX_BATCH_PATHS} paths"
    );
    let refused = response(ResponseBody::Transitioned(Err(WireError {
        code: vmsync_protocol::messages::ErrorCode::Io,
        message: "x".into(),
    })));
    assert!(decode_peak(&postcard::to_allocvec(&refused).unwrap()).1);
}
