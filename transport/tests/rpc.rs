//! A real client against a real server over an in-memory pipe: every `Endpoint` method through
//! the wire, pipelining, disconnects, handshake refusals, statistics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use support::*;
use vmsync_core::endpoint::{
    Change, ChunkData, ChunkRead, Endpoint, EndpointError, Outcome, ScanOptions, ScanScope,
    StageRequest,
};
use vmsync_core::{ChunkRef, Entry, Hash};
use vmsync_protocol::handshake;
use vmsync_protocol::{ChunkerParams, Hello};
use vmsync_transport::{
    client_handshake, RemoteEndpoint, ServerConfig, SessionConfig, TransportError,
};

fn text(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog\n"
        .iter()
        .cycle()
        .take(len)
        .copied()
        .collect()
}

/// Incompressible bytes (one seed: the same bytes each time).
fn noise(len: usize) -> Vec<u8> {
    vmsync_core::testing::noise(len, 0x9e37_79b9_7f4a_7c15)
}

/// Pushes `path` from a local fake to the remote one through the three-step transfer.
async fn push(local: &mut Fake, remote: &mut RemoteEndpoint, path: &str) -> Vec<Hash> {
    push_over(local, remote, path, None).await
}

/// [`push`] over what the remote has at `path` now (`expected`).
async fn push_over(
    local: &mut Fake,
    remote: &mut RemoteEndpoint,
    path: &str,
    expected: Option<Entry>,
) -> Vec<Hash> {
    let data = local.file(path).unwrap();
    let meta = meta_of(&data);
    let manifests = local.manifests(vec![(p(path), meta)]).await.unwrap();
    let manifest = manifests.into_iter().next().unwrap().unwrap();
    let staged = remote
        .stage(vec![StageRequest {
            path: p(path),
            meta,
            manifest: manifest.clone(),
        }])
        .await
        .unwrap();
    let missing: Vec<Hash> = staged
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|m| m.hash)
        .collect();
    let reads: Vec<ChunkRead> = manifest
        .chunks
        .iter()
        .filter(|c| missing.contains(&c.hash))
        .map(|c| ChunkRead {
            path: p(path),
            chunk: *c,
        })
        .collect();
    let datas = local.read_chunks(reads.clone()).await.unwrap();
    let supply: Vec<(Hash, ChunkData)> = reads
        .iter()
        .zip(datas)
        .map(|(r, d)| (r.chunk.hash, ChunkData::Whole(d.unwrap())))
        .collect();
    assert_eq!(remote.supply(supply).await.unwrap(), vec![]);
    let outcomes = remote
        .transition(vec![Change {
            path: p(path),
            expected,
            new: Some(Entry::File(meta)),
        }])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Applied]);
    missing
}

/// A targeted scan brings its small files' manifests along, so sending a file just
/// edited costs no `Manifests` round trip; a big file, or one whose metadata no longer fits,
/// is asked for as before.
#[tokio::test]
async fn a_targeted_scan_brings_small_files_manifests() {
    let small = text(3_000);
    let big = noise(300 * 1024);
    let guest = Fake::with_files(&[("d/small", small.clone()), ("d/big", big.clone())]);
    let pair = pair(guest).await;
    let mut remote = pair.session.endpoint(0).unwrap();
    remote
        .scan(ScanScope::Paths(vec![p("d")]), ScanOptions::default())
        .await
        .unwrap();
    let before = pair.session.stats().requests;
    let got = remote
        .manifests(vec![(p("d/small"), meta_of(&small))])
        .await
        .unwrap();
    assert_eq!(got, vec![Ok(manifest_of(&small))]);
    assert_eq!(
        pair.session.stats().requests,
        before,
        "answered from the scan"
    );

    let mut stale = meta_of(&small);
    stale.size += 1;
    let got = remote
        .manifests(vec![
            (p("d/big"), meta_of(&big)),
            (p("d/small"), meta_of(&small)),
            (p("d/small"), stale),
        ])
        .await
        .unwrap();
    assert_eq!(got[0], Ok(manifest_of(&big)));
    assert_eq!(got[1], Ok(manifest_of(&small)));
    assert!(got[2].is_err(), "{got:?}");
    assert_eq!(
        pair.session.stats().requests,
        before + 1,
        "one request, for the big and the stale file"
    );
}

/// A targeted scan carries the manifests only of files whose entries the host has not heard
/// in this session: after a full listing, a scan of a directory where one file was edited
/// carries that one manifest, not all of them; a later scan does not send it again.
#[tokio::test]
async fn a_targeted_scan_brings_only_manifests_the_host_has_not_heard_of() {
    let (a, b) = (text(3_000), text(4_000));
    let guest = Fake::with_files(&[("d/a", a.clone()), ("d/b", b)]);
    let pair = pair(guest.clone()).await;
    let mut remote = pair.session.endpoint(0).unwrap();
    remote
        .scan(ScanScope::Full, ScanOptions::default())
        .await
        .unwrap();
    // The requests it takes to get `path`'s manifest (checked against `data`).
    let asks = async |remote: &mut RemoteEndpoint, path: &str, data: &[u8]| {
        let before = pair.session.stats().requests;
        let got = remote.manifests(vec![(p(path), meta_of(data))]).await;
        assert_eq!(got.unwrap(), vec![Ok(manifest_of(data))], "{path}");
        pair.session.stats().requests - before
    };

    let edited = text(5_000);
    guest
        .state
        .lock()
        .unwrap()
        .files
        .insert(p("d/b"), edited.clone());
    let targeted = ScanScope::Paths(vec![p("d")]);
    remote
        .scan(targeted.clone(), ScanOptions::default())
        .await
        .unwrap();
    assert_eq!(
        asks(&mut remote, "d/b", &edited).await,
        0,
        "came with the scan"
    );
    assert_eq!(
        asks(&mut remote, "d/a", &a).await,
        1,
        "unchanged: asked for"
    );

    remote.scan(targeted, ScanOptions::default()).await.unwrap();
    assert_eq!(
        asks(&mut remote, "d/b", &edited).await,
        1,
        "the host heard of the edit in the previous scan: not sent again"
    );
}

#[tokio::test]
async fn every_method_through_the_wire() {
    let guest = Fake::with_files(&[("docs/readme", text(10_000)), ("bin/blob", noise(9_000))]);
    let pair = pair_with(
        guest.clone(),
        SessionConfig::default(),
        ServerConfig::default(),
    )
    .await;
    let mut remote = pair.session.endpoint(0).unwrap();
    assert_eq!(remote.share_name(), "src");

    // scan: full and scoped
    let report = remote
        .scan(ScanScope::Full, ScanOptions::default())
        .await
        .unwrap();
    let paths: Vec<_> = report.entries.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(paths, vec![p("bin/blob"), p("docs/readme")]);
    let scoped = remote
        .scan(ScanScope::Paths(vec![p("docs")]), ScanOptions::default())
        .await
        .unwrap();
    assert_eq!(scoped.entries.len(), 1);

    // manifests: one good, one stale
    let meta = meta_of(&text(10_000));
    let mut stale = meta;
    stale.size += 1;
    let manifests = remote
        .manifests(vec![(p("docs/readme"), meta), (p("docs/readme"), stale)])
        .await
        .unwrap();
    assert_eq!(manifests[0].as_ref().unwrap(), &manifest_of(&text(10_000)));
    assert!(manifests[1].is_err());

    // read_chunks: compressible text (zstd), noise (raw), and a read whose data changed
    let mut reads: Vec<ChunkRead> = manifest_of(&text(10_000))
        .chunks
        .into_iter()
        .map(|c| ChunkRead {
            path: p("docs/readme"),
            chunk: c,
        })
        .collect();
    reads.extend(
        manifest_of(&noise(9_000))
            .chunks
            .into_iter()
            .map(|c| ChunkRead {
                path: p("bin/blob"),
                chunk: c,
            }),
    );
    reads.push(ChunkRead {
        path: p("bin/blob"),
        chunk: ChunkRef {
            hash: hash(b"not this"),
            offset: 0,
            len: 8,
        },
    });
    let got = remote.read_chunks(reads.clone()).await.unwrap();
    assert_eq!(got.len(), reads.len());
    let text_back: Vec<u8> = got[..3].iter().flat_map(|c| c.clone().unwrap()).collect();
    assert_eq!(text_back, text(10_000));
    let noise_back: Vec<u8> = got[3..6].iter().flat_map(|c| c.clone().unwrap()).collect();
    assert_eq!(noise_back, noise(9_000));
    assert_eq!(got[6], None);

    // stage / supply / transition: host → guest, a new file and a directory
    let mut host = Fake::with_files(&[("new/file", vmsync_core::testing::noise(20_000, 42))]);
    let outcomes = remote
        .transition(vec![Change {
            path: p("new"),
            expected: None,
            new: Some(Entry::Dir {
                mode: 0o755,
                mtime: Default::default(),
            }),
        }])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Applied]);
    let missing = push(&mut host, &mut remote, "new/file").await;
    assert_eq!(missing.len(), 5);
    assert_eq!(
        guest.file("new/file").unwrap(),
        vmsync_core::testing::noise(20_000, 42)
    );

    // A copy of existing content moves no chunk data.
    host.state
        .lock()
        .unwrap()
        .files
        .insert(p("copy"), text(10_000));
    let missing = push(&mut host, &mut remote, "copy").await;
    assert!(missing.is_empty());
    assert_eq!(guest.file("copy").unwrap(), text(10_000));

    // transition against a stale expectation reports what is there
    let outcomes = remote
        .transition(vec![Change {
            path: p("copy"),
            expected: None,
            new: None,
        }])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![Outcome::Changed(Some(Entry::File(meta_of(&text(10_000)))))]
    );

    pair.session.ping().await.unwrap();

    // Statistics agree on both ends, and compression made text cheaper than its size.
    let client = pair.session.stats();
    let server = pair.server_stats.snapshot();
    assert_eq!(client.content_bytes_sent, 20_000, "noise is sent raw");
    assert_eq!(server.content_bytes_received, client.content_bytes_sent);
    assert_eq!(server.content_bytes_sent, client.content_bytes_received);
    assert!(client.content_bytes_received < 10_000 + 9_000, "{client:?}");
    assert!(client.content_bytes_received >= 9_000);
    // 2 scans, manifests, read_chunks, 2 × (stage, supply, transition), 2 more transitions;
    // pings are not requests.
    assert_eq!(client.requests, 12);
    assert_eq!(server.requests, 12);
    assert!(client.wire_bytes_sent > client.content_bytes_sent);
}

#[tokio::test]
async fn endpoint_errors_travel_as_values() {
    #[derive(Clone)]
    struct Broken;
    impl vmsync_core::endpoint::Endpoint for Broken {
        async fn scan(
            &mut self,
            scope: ScanScope,
            _: ScanOptions,
        ) -> Result<vmsync_core::endpoint::ScanReport, EndpointError> {
            match scope {
                ScanScope::Full => Err(EndpointError::RootMissing("/srv/share".into())),
                // A targeted scan works; the manifests its answer would carry do not.
                ScanScope::Paths(_) => Ok(vmsync_core::endpoint::ScanReport {
                    root: None,
                    entries: vec![(p("f"), Entry::File(meta_of(b"x")))],
                    problems: vec![],
                    ignored: vec![],
                    generation: None,
                }),
            }
        }
        async fn manifests(
            &mut self,
            _: Vec<(vmsync_core::RelPath, vmsync_core::FileMeta)>,
        ) -> Result<Vec<Result<vmsync_core::Manifest, vmsync_core::endpoint::Problem>>, EndpointError>
        {
            Err(EndpointError::Io("disk on fire".into()))
        }
        async fn read_chunks(
            &mut self,
            reads: Vec<ChunkRead>,
        ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
            // One answer too many: the server must not forward a miscounted answer.
            Ok(vec![None; reads.len() + 1])
        }
        async fn read_deltas(
            &mut self,
            reads: Vec<vmsync_core::endpoint::DeltaRead>,
        ) -> Result<Vec<Option<vmsync_core::endpoint::ChunkData>>, EndpointError> {
            Ok(vec![None; reads.len() + 1])
        }
        async fn stage(
            &mut self,
            _: Vec<StageRequest>,
        ) -> Result<
            Vec<Result<Vec<vmsync_core::endpoint::MissingChunk>, vmsync_core::endpoint::NotStaged>>,
            EndpointError,
        > {
            Err(EndpointError::Limit("quota".into()))
        }
        async fn supply(
            &mut self,
            _: Vec<(Hash, vmsync_core::endpoint::ChunkData)>,
        ) -> Result<Vec<Hash>, EndpointError> {
            Ok(vec![])
        }
        async fn transition(&mut self, _: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
            // A setuid mode breaks validation: the server answers with an error instead.
            Ok(vec![Outcome::Changed(Some(Entry::Dir {
                mode: 0o4755,
                mtime: Default::default(),
            }))])
        }
    }
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let server = tokio::spawn(async move {
        vmsync_transport::serve(
            b,
            |_: &vmsync_protocol::ShareOpen| Ok::<_, String>(Broken),
            "g",
        )
        .await
    });
    let hello = handshake::hello("h", vec![share("src")]);
    let (session, _) = client_handshake(a, hello).await.unwrap();
    let mut remote = session.endpoint(0).unwrap();
    assert_eq!(
        remote.scan(ScanScope::Full, ScanOptions::default()).await,
        Err(EndpointError::RootMissing("/srv/share".into()))
    );
    assert_eq!(
        remote
            .scan(ScanScope::Paths(vec![p("f")]), ScanOptions::default())
            .await
            .map(|r| r.entries.len()),
        Ok(1),
        "a scan whose manifests fail still answers"
    );
    assert_eq!(
        remote.manifests(vec![(p("f"), meta_of(b"x"))]).await,
        Err(EndpointError::Io("disk on fire".into()))
    );
    assert!(matches!(
        remote.read_chunks(vec![]).await,
        Err(EndpointError::Io(_))
    ));
    assert_eq!(
        remote.stage(vec![]).await,
        Err(EndpointError::Limit("quota".into()))
    );
    let err = remote.transition(vec![]).await.unwrap_err();
    assert!(
        matches!(&err, EndpointError::Io(t) if t.contains("mode")),
        "{err:?}"
    );
    // The session survived all of that.
    assert_eq!(remote.supply(vec![]).await, Ok(vec![]));
    assert!(!session.is_closed());
    session.close();
    assert_eq!(session.closed().await, "closed by the host");
    assert!(server.await.unwrap().is_ok());
}

#[tokio::test]
async fn many_requests_outstanding_at_once() {
    let (guest, gate) = Fake::with_files(&[("f", text(100))]).gated();
    let pair = pair(guest.clone()).await;
    let remote = pair.session.endpoint(0).unwrap();
    // 300 concurrent callers: far more than the server's limit of outstanding requests, which
    // the client must respect by holding the extra ones back.
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let mut r = remote.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    r.scan(ScanScope::Full, ScanOptions::default())
                        .await
                        .map(|s| s.entries.len())
                } else {
                    r.manifests(vec![(p("f"), meta_of(&text(100)))])
                        .await
                        .map(|m| m.len())
                }
            })
        })
        .collect();
    guest.wait_started(1).await;
    // Pings are answered while requests wait behind the gate.
    pair.session.ping().await.unwrap();
    gate.add_permits(300);
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(1));
    }
    assert!(!pair.session.is_closed());
    assert_eq!(pair.server_stats.snapshot().requests, 300);
}

#[tokio::test]
async fn disconnect_mid_request_fails_every_pending_call() {
    let (guest, _gate) = Fake::default().gated();
    let pair = pair(guest.clone()).await;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut r = pair.session.endpoint(0).unwrap();
            tokio::spawn(async move { r.scan(ScanScope::Full, ScanOptions::default()).await })
        })
        .collect();
    guest.wait_started(1).await;
    pair.server.abort();
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(matches!(err, EndpointError::Disconnected(_)), "{err:?}");
    }
    assert_eq!(
        pair.session.closed().await,
        "the guest closed the connection"
    );
    // Later calls fail at once.
    let mut r = pair.session.endpoint(0).unwrap();
    assert!(matches!(
        r.scan(ScanScope::Full, ScanOptions::default()).await,
        Err(EndpointError::Disconnected(_))
    ));
}

#[tokio::test]
async fn dropping_every_handle_ends_the_server_cleanly() {
    let pair = pair(Fake::default()).await;
    pair.session.ping().await.unwrap();
    drop(pair.session);
    assert!(pair.server.await.unwrap().is_ok());
}

async fn refused(mut hello: Hello, edit: impl FnOnce(&mut Hello)) -> (String, String) {
    edit(&mut hello);
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let server = spawn_server(b, Fake::default(), ServerConfig::default());
    let client = match client_handshake(a, hello).await {
        Err(TransportError::Refused { reason }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let server = match server.await.unwrap() {
        Err(TransportError::RefusedPeer { reason }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    (client, server)
}

#[tokio::test]
async fn handshake_refusals_are_clear_on_both_sides() {
    let hello = handshake::hello("h", vec![share("src"), share("nope")]);
    let (client, server) = refused(hello.clone(), |_| {}).await;
    assert_eq!(client, "share `nope` is not exported by this guest");
    assert_eq!(server, client);

    let (client, _) = refused(hello.clone(), |h| h.magic = *b"VMSYNC\0\x09").await;
    assert!(client.contains("bad magic"), "{client}");

    let (client, _) = refused(hello.clone(), |h| {
        h.min_version = 3;
        h.max_version = 4;
    })
    .await;
    assert!(client.contains("no common protocol version"), "{client}");
    let (client, _) = refused(hello.clone(), |h| {
        h.min_version = 0;
        h.max_version = 0;
    })
    .await;
    assert!(client.contains("no common protocol version"), "{client}");

    let (client, _) = refused(hello.clone(), |h| {
        h.chunker = ChunkerParams {
            min: 2048,
            avg: 8192,
            max: 32768,
        }
    })
    .await;
    assert!(client.contains("chunker parameters differ"), "{client}");

    let (client, _) = refused(hello.clone(), |h| {
        h.shares = vec![share("src"), share("src")]
    })
    .await;
    assert!(client.contains("requested twice"), "{client}");

    let (client, _) = refused(hello, |h| h.shares = vec![share("../etc")]).await;
    assert!(client.contains("is invalid"), "{client}");
}

#[tokio::test]
async fn several_shares_on_one_session() {
    let guest = Fake::with_files(&[("x", text(10))]);
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let _server = spawn_server(b, guest, ServerConfig::default());
    let hello = handshake::hello("h", vec![share("src"), share("also")]);
    let (session, welcome) = client_handshake(a, hello).await.unwrap();
    assert_eq!(
        welcome.version,
        vmsync_protocol::messages::PROTOCOL_VERSION_MAX
    );
    assert_eq!(session.shares(), ["src".to_owned(), "also".to_owned()]);
    let mut second = session.endpoint(1).unwrap();
    assert_eq!(
        second
            .scan(ScanScope::Full, ScanOptions::default())
            .await
            .unwrap()
            .entries
            .len(),
        1
    );
    assert!(matches!(
        session.endpoint(2),
        Err(TransportError::NoSuchShare { index: 2, count: 2 })
    ));
}

#[tokio::test]
async fn oversized_requests_fail_alone() {
    let pair = pair(Fake::default()).await;
    let mut remote = pair.session.endpoint(0).unwrap();
    let too_many = vec![
        (Hash::default(), ChunkData::Whole(vec![1u8]));
        vmsync_protocol::limits::MAX_BATCH_CHUNKS + 1
    ];
    assert!(matches!(
        remote.supply(too_many).await,
        Err(EndpointError::Limit(_))
    ));
    let oversized_chunk = vec![(
        Hash::default(),
        ChunkData::Whole(vec![0u8; vmsync_core::limits::CHUNK_MAX_BYTES as usize + 1]),
    )];
    assert!(matches!(
        remote.supply(oversized_chunk).await,
        Err(EndpointError::Limit(_) | EndpointError::Protocol(_))
    ));
    assert!(!pair.session.is_closed());
    pair.session.ping().await.unwrap();
}

#[tokio::test]
async fn bulk_batches_follow_the_level_small_ones_always_compress() {
    let pair = pair(Fake::default()).await;
    // Bulk level 0: a batch of 1 MiB or more travels raw...
    let mut remote = pair.session.endpoint(0).unwrap().with_zstd_level(0);
    let bulk: Vec<(Hash, ChunkData)> = (0..16u8)
        .map(|i| {
            let data = vec![i; 64 * 1024];
            (hash(&data), ChunkData::Whole(data))
        })
        .collect();
    remote.supply(bulk).await.unwrap();
    assert_eq!(pair.session.stats().content_bytes_sent, 1 << 20);
    // ...while a small batch (a live edit) is compressed whatever the bulk level.
    let data = vec![1u8; 4096];
    remote
        .supply(vec![(hash(&data), ChunkData::Whole(data))])
        .await
        .unwrap();
    assert!(pair.session.stats().content_bytes_sent < (1 << 20) + 100);
    let _ = Arc::clone(&pair.server_stats);
}

#[tokio::test]
async fn session_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let addr: vmsync_transport::EndpointAddr =
        format!("unix:{}", dir.path().join("g.sock").display())
            .parse()
            .unwrap();
    let listener = vmsync_transport::listen(&addr).await.unwrap();
    let guest = Fake::with_files(&[("f", text(5000))]);
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        vmsync_transport::serve(stream, exports(guest), "g").await
    });
    let stream = vmsync_transport::connect(&addr).await.unwrap();
    let (session, _) = client_handshake(stream, handshake::hello("h", vec![share("src")]))
        .await
        .unwrap();
    let mut remote = session.endpoint(0).unwrap();
    let report = remote
        .scan(ScanScope::Full, ScanOptions::default())
        .await
        .unwrap();
    assert_eq!(report.entries.len(), 1);
    drop(remote);
    drop(session);
    assert!(server.await.unwrap().is_ok());
}

/// A small change to a big file the guest already holds: `Stage2` carries the manifest as
/// edits against the old one (a few dozen bytes instead of 256 references). When the guest's
/// copy changed behind the session's back, it answers `BaseUnknown` and the file is staged
/// again in full: slower, still right.
#[tokio::test]
async fn a_small_change_to_a_big_file_stages_as_manifest_edits() {
    let v1 = vmsync_core::testing::noise(1 << 20, 1);
    let mut host = Fake::with_files(&[("big", v1.clone())]);
    let guest = Fake::default();
    let pair = pair(guest.clone()).await;
    let mut remote = pair.session.endpoint(0).unwrap();
    let first = pair.session.stats().wire_bytes_sent;
    push(&mut host, &mut remote, "big").await;
    let first = pair.session.stats().wire_bytes_sent - first;
    let manifest_bytes = 256 * 40;
    assert!(first > (1 << 20) + manifest_bytes, "{first}");

    // One 4 KiB chunk changes.
    let mut v2 = v1.clone();
    v2[500_000..500_100].copy_from_slice(&vmsync_core::testing::noise(100, 2));
    host.state
        .lock()
        .unwrap()
        .files
        .insert(p("big"), v2.clone());
    let before = pair.session.stats().wire_bytes_sent;
    let missing = push_over(
        &mut host,
        &mut remote,
        "big",
        Some(Entry::File(meta_of(&v1))),
    )
    .await;
    let sent = pair.session.stats().wire_bytes_sent - before;
    assert_eq!(missing.len(), 1);
    assert_eq!(guest.file("big"), Some(v2.clone()));
    // The chunk, the edits and the transition: far below the full manifest's 10 KiB alone.
    assert!(
        sent < 4096 + 1024,
        "{sent} bytes sent for a one-chunk change"
    );

    // The guest's copy is replaced behind the session's back: the edits do not fit.
    let v3 = vmsync_core::testing::noise(1 << 20, 3);
    guest
        .state
        .lock()
        .unwrap()
        .files
        .insert(p("big"), v3.clone());
    let mut v4 = v2.clone();
    v4[10..20].copy_from_slice(b"0123456789");
    host.state
        .lock()
        .unwrap()
        .files
        .insert(p("big"), v4.clone());
    let requests = pair.session.stats().requests;
    push_over(
        &mut host,
        &mut remote,
        "big",
        Some(Entry::File(meta_of(&v3))),
    )
    .await;
    assert_eq!(guest.file("big"), Some(v4));
    // Stage2 twice (edits, then in full), Supply2, Transition.
    assert_eq!(pair.session.stats().requests - requests, 4);
}
