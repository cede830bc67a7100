//! Golden byte vectors: the exact encoding of a fixed `Hello`, `Welcome`, `Refused`, a request of
//! every kind and a response of every kind. Any change to the wire format (a reordered variant, a
//! new field in a core type, a postcard upgrade that changes layout) fails here. If a failure is
//! an intended format change, bump the protocol version and update the vectors in one commit.
#![allow(clippy::unwrap_used)]

use vmsync_core::edits::ManifestEdit;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkRead, EndpointError, MissingChunk, Outcome, Problem, RootId,
    ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::{ChunkRef, Entry, FileMeta, Hash, Manifest, RelPath, Timestamp};
use vmsync_protocol::messages::{
    BasedRead, ManifestForm, ScanDelta, ScanWithManifests, StageAnswer, StageFile,
    FEATURE_CHUNK_DELTA, FEATURE_SCAN_MANIFESTS, MAGIC,
};
use vmsync_protocol::{
    decode_message, encode_message, ChunkerParams, Codec, Hello, Message, Refused, Request,
    RequestBody, Response, ResponseBody, ShareOpen, Welcome, WireChunk, WireContent, WireDelta,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes `m`, compares with `want` (hex), and checks it decodes back to `m`.
fn golden(name: &str, m: Message, want: &str) {
    let bytes = encode_message(&m, usize::MAX).unwrap();
    assert_eq!(hex(&bytes), want, "{name}: wire format changed");
    let back: Message = decode_message(&bytes).unwrap();
    assert_eq!(back, m, "{name}: does not decode back");
}

fn p(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

/// The mtime of every entry in these vectors: `80c49fd50c` (seconds, zigzag varint), `7b` (nanos).
const T: Timestamp = Timestamp::new(1_700_000_000, 123);

fn meta() -> FileMeta {
    FileMeta {
        size: 5,
        mode: 0o644,
        mtime: Timestamp::new(1_700_000_000, 123),
        digest: Hash([0x11; 32]),
    }
}

fn chunk_ref() -> ChunkRef {
    ChunkRef {
        hash: Hash([0x22; 32]),
        offset: 0,
        len: 5,
    }
}

fn problem() -> Problem {
    Problem {
        path: p("d"),
        reason: "fifo skipped".into(),
    }
}

fn request(body: RequestBody) -> Message {
    Message::Request(Request {
        id: 7,
        share: 1,
        body,
    })
}

fn response(body: ResponseBody) -> Message {
    Message::Response(Response { id: 7, body })
}

#[test]
fn handshake_messages() {
    golden(
        "Hello",
        Message::Hello(Hello {
            magic: MAGIC,
            min_version: 2,
            max_version: 2,
            agent_version: "vmsync-host 0.1.0".into(),
            features: 0,
            chunker: ChunkerParams::PINNED,
            shares: vec![ShareOpen {
                name: "src".into(),
                ignore: vec!["target/".into(), "*.o".into()],
                respect_gitignore: true,
            }],
        }),
        "00564d53594e430001020211766d73796e632d686f737420302e312e30008020808001808004010373726302077461726765742f032a2e6f01",
    );
    golden(
        "Welcome",
        Message::Welcome(Welcome {
            version: 2,
            agent_version: "vmsync-guest 0.1.0".into(),
            chunker: ChunkerParams::PINNED,
            features: 0,
        }),
        "010212766d73796e632d677565737420302e312e30802080800180800400",
    );
    golden(
        "Refused",
        Message::Refused(Refused {
            reason: "share `x` is not exported by this guest".into(),
        }),
        "0227736861726520607860206973206e6f74206578706f727465642062792074686973206775657374",
    );
}

#[test]
fn requests() {
    golden("Ping", request(RequestBody::Ping), "03070100");
    golden(
        "Scan full",
        request(RequestBody::Scan {
            scope: ScanScope::Full,
            options: ScanOptions::default(),
        }),
        "030701010000",
    );
    golden(
        "Scan paths",
        request(RequestBody::Scan {
            scope: ScanScope::Paths(vec![p("a"), p("a/b")]),
            options: ScanOptions {
                create_marker: true,
            },
        }),
        "030701010102016103612f6201",
    );
    golden("Manifests", request(RequestBody::Manifests { files: vec![(p("a/b"), meta())] }), "030701020103612f6205a40380c49fd50c7b1111111111111111111111111111111111111111111111111111111111111111");
    golden(
        "ReadChunks",
        request(RequestBody::ReadChunks {
            reads: vec![ChunkRead {
                path: p("a/b"),
                chunk: chunk_ref(),
            }],
        }),
        "030701030103612f6222222222222222222222222222222222222222222222222222222222222222220005",
    );
    golden(
        "Stage",
        request(RequestBody::Stage {
            files: vec![StageRequest {
                path: p("a/b"),
                meta: meta(),
                manifest: Manifest { chunks: vec![chunk_ref()], links: vec![] },
            }],
        }),
        "030701040103612f6205a40380c49fd50c7b1111111111111111111111111111111111111111111111111111111111111111012222222222222222222222222222222222222222222222222222222222222222000500",
    );
    golden(
        "Supply",
        request(RequestBody::Supply {
            chunks: vec![
                WireChunk { hash: Hash([0x33; 32]), len: 3, codec: Codec::Raw, data: b"abc".to_vec() },
                WireChunk { hash: Hash([0x44; 32]), len: 10, codec: Codec::Zstd, data: vec![0x28, 0xb5] },
            ],
        }),
        "0307010502333333333333333333333333333333333333333333333333333333333333333303000361626344444444444444444444444444444444444444444444444444444444444444440a010228b5",
    );
    golden(
        "Transition",
        request(RequestBody::Transition {
            changes: vec![
                Change { path: p("a/b"), expected: None, new: Some(Entry::File(meta())) },
                Change {
                    path: p("c"),
                    expected: Some(Entry::Symlink { target: b"x".to_vec(), mtime: T }),
                    new: None,
                },
                Change { path: p("d"), expected: None, new: Some(Entry::Dir { mode: 0o755, mtime: T }) },
            ],
        }),
        "030701060303612f6200010005a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111101630102017880c49fd50c7b000164000101ed0380c49fd50c7b",
    );
    golden(
        "PollChanges",
        request(RequestBody::PollChanges {
            max_wait_ms: 25_000,
        }),
        "03070107a8c301",
    );
    golden(
        "ScanFull",
        request(RequestBody::ScanFull {
            options: ScanOptions {
                create_marker: true,
            },
            base: Some(7),
        }),
        "03070108010107",
    );
}

#[test]
fn responses() {
    golden("Pong", response(ResponseBody::Pong), "040700");
    golden(
        "Scan",
        response(ResponseBody::Scan(Ok(ScanReport {
            root: Some(RootId { marker: [0x55; 16], dev: 2049, ino: 12345 }),
            entries: vec![
                (p("a"), Entry::Dir { mode: 0o755, mtime: T }),
                (p("a/b"), Entry::File(meta())),
                (p("c"), Entry::Symlink { target: b"a/b".to_vec(), mtime: T }),
            ],
            problems: vec![problem()],
            ignored: vec![p("e")],
            generation: Some(300),
        }))),
        "0407010001555555555555555555555555555555558110b96003016101ed0380c49fd50c7b03612f620005a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111101630203612f6280c49fd50c7b0101640c6669666f20736b697070656401016501ac02",
    );
    golden(
        "Manifests",
        response(ResponseBody::Manifests(Ok(vec![
            Ok(Manifest { chunks: vec![chunk_ref()], links: vec![] }),
            Err(problem()),
        ]))),
        "0407020002000122222222222222222222222222222222222222222222222222222222222222220005000101640c6669666f20736b6970706564",
    );
    golden(
        "ReadChunks",
        response(ResponseBody::ReadChunks(Ok(vec![
            Some(WireChunk { hash: Hash([0x22; 32]), len: 5, codec: Codec::Raw, data: b"hello".to_vec() }),
            None,
        ]))),
        "040703000201222222222222222222222222222222222222222222222222222222222222222205000568656c6c6f00",
    );
    golden(
        "Stage",
        response(ResponseBody::Stage(Ok(vec![Ok(vec![Hash([0x22; 32])]), Err(problem())]))),
        "0407040002000122222222222222222222222222222222222222222222222222222222222222220101640c6669666f20736b6970706564",
    );
    golden("Supply", response(ResponseBody::Supply(Ok(()))), "04070500");
    golden(
        "Transition",
        response(ResponseBody::Transition(Ok(vec![
            Outcome::Applied,
            Outcome::Changed(None),
            Outcome::Changed(Some(Entry::Dir {
                mode: 0o700,
                mtime: T,
            })),
            Outcome::Failed("disk full".into()),
        ]))),
        "0407060004000100010101c00380c49fd50c7b02096469736b2066756c6c",
    );
    golden(
        "Changes",
        response(ResponseBody::Changes(Ok(ChangeHints {
            paths: vec![p("a/b"), p("c")],
            rescan: false,
        }))),
        "040707000203612f62016300",
    );
    golden(
        "ScanDelta",
        response(ResponseBody::ScanDelta(Ok(ScanDelta {
            token: 9,
            base: Some(7),
            root: None,
            changed: vec![(p("a/b"), Entry::File(meta()))],
            removed: vec![p("c")],
            problems: vec![problem()],
            ignored: vec![p("e")],
            generation: Some(7),
        }))),
        "04070800090107000103612f620005a40380c49fd50c7b11111111111111111111111111111111111111111111111111111111111111110101630101640c6669666f20736b69707065640101650107",
    );
}

#[test]
fn endpoint_errors() {
    let errors = [
        (EndpointError::RootMissing("r".into()), "04070101000172"),
        (EndpointError::RootNotDir("r".into()), "04070101010172"),
        (EndpointError::UnknownShare("r".into()), "04070101020172"),
        (EndpointError::Disconnected("r".into()), "04070101030172"),
        (EndpointError::Protocol("r".into()), "04070101040172"),
        (EndpointError::Io("r".into()), "04070101050172"),
        (EndpointError::Limit("r".into()), "04070101060172"),
        // Appended: a side below its free-space reserve (varint free, then reserve).
        (
            EndpointError::DiskFull {
                free: 1,
                reserve: 300,
            },
            "040701010701ac02",
        ),
    ];
    for (e, want) in errors {
        golden(
            &format!("{e:?}"),
            response(ResponseBody::Scan(Err(e.clone()))),
            want,
        );
    }
}

/// The chunk-delta messages (`Stage2`, `ReadChunks2`, `Supply2` and their answers) and the
/// feature bit that enables them.
#[test]
fn chunk_delta_messages() {
    assert_eq!(FEATURE_CHUNK_DELTA, 1);
    golden(
        "Hello with chunk deltas",
        Message::Hello(Hello {
            magic: MAGIC,
            min_version: 1,
            max_version: 1,
            agent_version: "h".into(),
            features: FEATURE_CHUNK_DELTA,
            chunker: ChunkerParams::PINNED,
            shares: vec![],
        }),
        "00564d53594e4300010101016801802080800180800400",
    );
    golden(
        "Stage2",
        request(RequestBody::Stage2 {
            files: vec![StageFile {
                path: p("a/b"),
                meta: meta(),
                manifest: ManifestForm::Full(Manifest { chunks: vec![chunk_ref()], links: vec![] }),
            }],
        }),
        "030701090103612f6205a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111100012222222222222222222222222222222222222222222222222222222222222222000500",
    );
    golden(
        "ReadChunks2",
        request(RequestBody::ReadChunks2 {
            reads: vec![
                BasedRead { read: ChunkRead { path: p("a/b"), chunk: chunk_ref() }, base: Some(vec![0x72, 0x73]) },
                BasedRead { read: ChunkRead { path: p("c"), chunk: chunk_ref() }, base: None },
            ],
        }),
        "0307010a0203612f62222222222222222222222222222222222222222222222222222222222222222200050102727301632222222222222222222222222222222222222222222222222222222222222222000500",
    );
    golden(
        "Supply2",
        request(RequestBody::Supply2 {
            chunks: vec![
                WireContent::Whole(WireChunk { hash: Hash([0x33; 32]), len: 3, codec: Codec::Raw, data: b"abc".to_vec() }),
                WireContent::Delta(WireDelta { hash: Hash([0x44; 32]), len: 10, codec: Codec::Zstd, data: vec![0x28, 0xb5] }),
            ],
        }),
        "0307010b020033333333333333333333333333333333333333333333333333333333333333330300036162630144444444444444444444444444444444444444444444444444444444444444440a010228b5",
    );
    golden(
        "Stage2 answer",
        response(ResponseBody::Stage2(Ok(vec![
            StageAnswer::Missing(vec![
                MissingChunk { hash: Hash([0x22; 32]), base: Some(vec![1, 2, 3]) },
                MissingChunk { hash: Hash([0x33; 32]), base: None },
            ]),
            StageAnswer::Problem(problem()),
        ]))),
        "04070900020002222222222222222222222222222222222222222222222222222222222222222201030102033333333333333333333333333333333333333333333333333333333333333333000101640c6669666f20736b6970706564",
    );
    golden(
        "ReadChunks2 answer",
        response(ResponseBody::ReadChunks2(Ok(vec![
            Some(WireContent::Whole(WireChunk { hash: Hash([0x22; 32]), len: 5, codec: Codec::Raw, data: b"hello".to_vec() })),
            Some(WireContent::Delta(WireDelta { hash: Hash([0x22; 32]), len: 2, codec: Codec::Raw, data: vec![0, 9] })),
            None,
        ]))),
        "04070a00030100222222222222222222222222222222222222222222222222222222222222222205000568656c6c6f01012222222222222222222222222222222222222222222222222222222222222222020002000900",
    );
    golden(
        "Supply2 answer",
        response(ResponseBody::Supply2(Ok(vec![Hash([0x44; 32])]))),
        "04070b00014444444444444444444444444444444444444444444444444444444444444444",
    );
}

/// `Scan2` (a targeted scan whose answer carries small files' manifests) and its feature bit.
#[test]
fn scan_with_manifests_messages() {
    assert_eq!(FEATURE_SCAN_MANIFESTS, 2);
    golden(
        "Scan2",
        request(RequestBody::Scan2 {
            scope: ScanScope::Paths(vec![p("a/b")]),
            options: ScanOptions {
                create_marker: false,
            },
        }),
        "0307010c010103612f6200",
    );
    golden(
        "Scan2 answer",
        response(ResponseBody::Scan2(Ok(ScanWithManifests {
            report: ScanReport {
                root: None,
                entries: vec![(p("a/b"), Entry::File(meta()))],
                problems: vec![],
                ignored: vec![],
                generation: None,
            },
            manifests: vec![(p("a/b"), Manifest { chunks: vec![chunk_ref()], links: vec![] })],
        }))),
        "04070c00000103612f620005a40380c49fd50c7b11111111111111111111111111111111111111111111111111111111111111110000000103612f62012222222222222222222222222222222222222222222222222222222222222222000500",
    );
}

/// The share generation: `Mark` and its answer (the scan reports' field is pinned with them).
#[test]
fn generation_messages() {
    golden(
        "Mark",
        request(RequestBody::Mark { generation: 300 }),
        "0307010dac02",
    );
    golden("Marked", response(ResponseBody::Marked(Ok(()))), "04070d00");
    golden(
        "Marked error",
        response(ResponseBody::Marked(Err(EndpointError::Io("r".into())))),
        "04070d01050172",
    );
}

/// Manifest edits in `Stage2` and the answer that asks for the full manifest instead.
#[test]
fn manifest_edit_messages() {
    golden(
        "Stage2 with edits",
        request(RequestBody::Stage2 {
            files: vec![StageFile {
                path: p("a/b"),
                meta: meta(),
                manifest: ManifestForm::Edits {
                    base_size: 70_000,
                    base_digest: Hash([0x55; 32]),
                    edits: vec![
                        ManifestEdit::Copy { start: 0, count: 40 },
                        ManifestEdit::New(vec![(Hash([0x22; 32]), 5)]),
                        ManifestEdit::Copy { start: 41, count: 300 },
                    ],
                },
            }],
        }),
        "030701090103612f6205a40380c49fd50c7b111111111111111111111111111111111111111111111111111111111111111101f0a20455555555555555555555555555555555555555555555555555555555555555550300002801012222222222222222222222222222222222222222222222222222222222222222050029ac02",
    );
    golden(
        "Stage2 answer BaseUnknown",
        response(ResponseBody::Stage2(Ok(vec![StageAnswer::BaseUnknown]))),
        "040709000102",
    );
}
