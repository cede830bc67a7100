//! Peers that break the rules. A "hostile host" writes raw frames and messages at our server; a
//! "hostile guest" answers our client with raw frames and messages. Every violation must end the
//! session with a clear error and never reach the local endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use vmsync_core::endpoint::{
    Change, ChunkRead, Endpoint, EndpointError, Outcome, ScanOptions, ScanReport, ScanScope,
};
use vmsync_core::{ChunkRef, Entry, Hash};
use vmsync_protocol::chunk::{encode_chunk, hash_chunk};
use vmsync_protocol::limits::{MAX_FRAME_BYTES, MAX_HANDSHAKE_BYTES, MAX_OUTSTANDING_REQUESTS};
use vmsync_protocol::{
    handshake, CodecError, FrameError, Message, Request, RequestBody, Response, ResponseBody,
    Welcome,
};
use vmsync_transport::{client_handshake, ServerConfig, TransportError};

// ---------------------------------------------------------------- hostile host vs our server

/// Runs a real server against whatever `host` writes; returns the server's result.
async fn server_result_after<F, Fut>(guest: Fake, host: F) -> Result<(), TransportError>
where
    F: FnOnce(Raw) -> Fut,
    Fut: std::future::Future<Output = Raw>,
{
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let server = spawn_server(b, guest, ServerConfig::default());
    let raw_host = host(raw(a)).await;
    let result = server.await.unwrap();
    drop(raw_host);
    result
}

async fn bytes_then_eof(bytes: Vec<u8>) -> Result<(), TransportError> {
    server_result_after(Fake::default(), |mut host| async move {
        send_raw_bytes(&mut host, &bytes).await;
        host.get_mut().shutdown().await.unwrap();
        host
    })
    .await
}

fn frame_error(r: Result<(), TransportError>) -> FrameError {
    match r {
        Err(TransportError::Codec(CodecError::Frame(e))) => e,
        other => panic!("expected a framing error, got {other:?}"),
    }
}

fn protocol_error(r: Result<(), TransportError>) -> String {
    match r {
        Err(TransportError::Protocol(what)) => what,
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_frame_headers() {
    let e = frame_error(bytes_then_eof(u32::MAX.to_be_bytes().to_vec()).await);
    assert!(matches!(e, FrameError::FragmentTooLarge { .. }), "{e:?}");

    let header = frame_header(MAX_HANDSHAKE_BYTES as u32 + 1, false).to_vec();
    let e = frame_error(bytes_then_eof(header).await);
    assert!(
        matches!(e, FrameError::MessageTooLarge { len, max } if len == MAX_HANDSHAKE_BYTES + 1 && max == MAX_HANDSHAKE_BYTES),
        "{e:?}"
    );

    // After the handshake the message cap is higher, but a fragment is still at most 1 MiB.
    let r = server_result_after(Fake::default(), |host| async move {
        let mut host = raw_host_after_handshake(host.into_inner()).await;
        send_raw_bytes(&mut host, &frame_header(MAX_FRAME_BYTES as u32 + 1, false)).await;
        host
    })
    .await;
    assert!(matches!(
        frame_error(r),
        FrameError::FragmentTooLarge { .. }
    ));
}

#[tokio::test]
async fn truncated_input_then_eof() {
    let mut half_body = frame_header(100, false).to_vec();
    half_body.extend_from_slice(&[0u8; 10]);
    for bytes in [
        vec![0u8, 0],
        half_body,
        frame_header(5, true)
            .iter()
            .chain(b"abcde")
            .copied()
            .collect(),
    ] {
        let e = frame_error(bytes_then_eof(bytes.clone()).await);
        assert!(
            matches!(e, FrameError::Truncated { .. }),
            "{bytes:?}: {e:?}"
        );
    }
    assert!(matches!(
        bytes_then_eof(vec![]).await,
        Err(TransportError::ClosedDuringHandshake)
    ));
}

#[tokio::test]
async fn garbage_bytes() {
    let e = frame_error(bytes_then_eof(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await);
    assert!(matches!(e, FrameError::FragmentTooLarge { .. }), "{e:?}");

    let mut junk = frame_header(5, false).to_vec();
    junk.extend_from_slice(&[0xff; 5]);
    assert!(matches!(
        bytes_then_eof(junk).await,
        Err(TransportError::Codec(CodecError::Decode(_)))
    ));

    let e = frame_error(bytes_then_eof(frame_header(0, false).to_vec()).await);
    assert!(matches!(e, FrameError::EmptyMessage));

    // An unknown message tag.
    let mut unknown = frame_header(1, false).to_vec();
    unknown.push(9);
    assert!(matches!(
        bytes_then_eof(unknown).await,
        Err(TransportError::Codec(CodecError::Decode(_)))
    ));

    // A Hello whose first field is an over-long varint: valid postcard, not canonical.
    let hello = bytes_of(&Message::Hello(handshake::hello("h", vec![share("src")])));
    let mut body = hello[4..].to_vec();
    body[0] = 0x80;
    body.insert(1, 0x00);
    let mut noncanonical = frame_header(body.len() as u32, false).to_vec();
    noncanonical.extend_from_slice(&body);
    assert!(matches!(
        bytes_then_eof(noncanonical).await,
        Err(TransportError::Codec(CodecError::NonCanonical))
    ));
}

#[tokio::test]
async fn message_before_hello() {
    let r = server_result_after(Fake::default(), |mut host| async move {
        host.send(Message::Request(Request {
            id: 1,
            share: 0,
            body: RequestBody::Ping,
        }))
        .await
        .unwrap();
        host
    })
    .await;
    assert_eq!(protocol_error(r), "expected Hello, got Request");
}

#[tokio::test]
async fn two_hellos() {
    let guest = Fake::default();
    let r = server_result_after(guest.clone(), |host| async move {
        let mut host = raw_host_after_handshake(host.into_inner()).await;
        host.send(Message::Hello(handshake::hello(
            "again",
            vec![share("src")],
        )))
        .await
        .unwrap();
        host
    })
    .await;
    assert_eq!(protocol_error(r), "a second Hello");
    assert_eq!(guest.started.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn guest_only_messages_from_the_host() {
    let welcome = Message::Welcome(Welcome {
        version: 1,
        agent_version: "x".into(),
        chunker: vmsync_protocol::ChunkerParams::PINNED,
    });
    let response = Message::Response(Response {
        id: 1,
        body: ResponseBody::Pong,
    });
    for m in [welcome, response] {
        let r = server_result_after(Fake::default(), |host| async move {
            let mut host = raw_host_after_handshake(host.into_inner()).await;
            host.send(m).await.unwrap();
            host
        })
        .await;
        assert!(protocol_error(r).contains("which only a guest sends"));
    }
}

#[tokio::test]
async fn share_index_out_of_range() {
    let guest = Fake::default();
    let r = server_result_after(guest.clone(), |host| async move {
        let mut host = raw_host_after_handshake(host.into_inner()).await;
        let scan = RequestBody::ScanFull {
            options: ScanOptions::default(),
            base: None,
        };
        host.send(Message::Request(Request {
            id: 5,
            share: 1,
            body: scan,
        }))
        .await
        .unwrap();
        host
    })
    .await;
    assert_eq!(
        protocol_error(r),
        "request 5 names share 1, but the session opened 1"
    );
    assert_eq!(guest.started.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn too_many_outstanding_requests() {
    let (guest, _gate) = Fake::default().gated();
    let r = server_result_after(guest, |host| async move {
        let mut host = raw_host_after_handshake(host.into_inner()).await;
        for id in 0..(MAX_OUTSTANDING_REQUESTS as u64 + 5) {
            let scan = RequestBody::ScanFull {
                options: ScanOptions::default(),
                base: None,
            };
            if host
                .send(Message::Request(Request {
                    id,
                    share: 0,
                    body: scan,
                }))
                .await
                .is_err()
            {
                break;
            }
        }
        host
    })
    .await;
    assert_eq!(
        protocol_error(r),
        format!("more than {MAX_OUTSTANDING_REQUESTS} requests outstanding")
    );
}

#[tokio::test]
async fn bad_supplied_chunk_is_refused_and_the_session_goes_on() {
    let guest = Fake::default();
    let r = server_result_after(guest.clone(), |host| async move {
        let mut host = raw_host_after_handshake(host.into_inner()).await;
        let data = vec![7u8; 1000];
        let mut chunk = encode_chunk(hash_chunk(&data), &data, 3);
        chunk.hash = hash_chunk(b"something else");
        host.send(Message::Request(Request {
            id: 1,
            share: 0,
            body: RequestBody::Supply {
                chunks: vec![vmsync_protocol::WireContent::Whole(chunk)],
            },
        }))
        .await
        .unwrap();
        match host.next().await {
            Some(Ok(Message::Response(Response {
                id: 1,
                body:
                    ResponseBody::Supplied(Err(vmsync_protocol::messages::WireError {
                        code: vmsync_protocol::messages::ErrorCode::Protocol,
                        message: why,
                    })),
            }))) => {
                // Refused by the endpoint's own check (its contract): the server does not hash
                // supplied chunks a second time.
                assert!(why.contains("does not hash to its id"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        host.send(Message::Request(Request {
            id: 2,
            share: 0,
            body: RequestBody::Ping,
        }))
        .await
        .unwrap();
        assert!(matches!(
            host.next().await,
            Some(Ok(Message::Response(Response {
                id: 2,
                body: ResponseBody::Pong
            })))
        ));
        host.get_mut().shutdown().await.unwrap();
        host
    })
    .await;
    assert!(r.is_ok(), "{r:?}");
    assert!(guest.state.lock().unwrap().store.is_empty());
}

// ---------------------------------------------------------------- hostile guest vs our client

async fn client_against<F, Fut>(guest: F) -> Result<vmsync_transport::Session, TransportError>
where
    F: FnOnce(Raw) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(async move { guest(raw(b)).await });
    client_handshake(a, handshake::hello("h", vec![share("src")]))
        .await
        .map(|(s, _)| s)
}

#[tokio::test]
async fn hostile_handshake_answers() {
    let r = client_against(|mut g| async move {
        let _ = g.next().await;
        g.send(Message::Request(Request {
            id: 1,
            share: 0,
            body: RequestBody::Ping,
        }))
        .await
        .unwrap();
    })
    .await;
    assert!(
        matches!(&r, Err(TransportError::Protocol(w)) if w == "expected Welcome or Refused, got Request"),
        "{r:?}"
    );

    let r = client_against(|mut g| async move {
        let _ = g.next().await;
        let w = Welcome {
            version: 7,
            agent_version: "x".into(),
            chunker: vmsync_protocol::ChunkerParams::PINNED,
        };
        g.send(Message::Welcome(w)).await.unwrap();
    })
    .await;
    assert!(matches!(r, Err(TransportError::BadWelcome(_))), "{r:?}");

    let r = client_against(|mut g| async move {
        let _ = g.next().await;
        send_raw_bytes(&mut g, &u32::MAX.to_be_bytes()).await;
    })
    .await;
    assert!(
        matches!(
            r,
            Err(TransportError::Codec(CodecError::Frame(
                FrameError::FragmentTooLarge { .. }
            )))
        ),
        "{r:?}"
    );

    let r = client_against(|mut g| async move {
        let _ = g.next().await;
    })
    .await;
    assert!(
        matches!(r, Err(TransportError::ClosedDuringHandshake)),
        "{r:?}"
    );

    // A refusal reason with terminal escapes is shown escaped.
    let r = client_against(|mut g| async move {
        let _ = g.next().await;
        g.send(Message::Refused(vmsync_protocol::Refused {
            reason: "no\x1b[2J".into(),
        }))
        .await
        .unwrap();
    })
    .await;
    assert!(
        matches!(&r, Err(TransportError::Refused { reason }) if reason == "no\\x1b[2J"),
        "{r:?}"
    );
}

/// A raw guest that welcomes the host, then answers the first request with `answer(request)`
/// and keeps the connection open until the host goes away.
async fn session_with_answer(
    answer: impl FnOnce(Request) -> Vec<u8> + Send + 'static,
) -> vmsync_transport::Session {
    client_against(|mut g| async move {
        raw_guest_welcome(&mut g).await;
        loop {
            match g.next().await {
                Some(Ok(Message::Request(r))) if r.body == RequestBody::Ping => {
                    let _ = g
                        .send(Message::Response(Response {
                            id: r.id,
                            body: ResponseBody::Pong,
                        }))
                        .await;
                }
                Some(Ok(Message::Request(r))) => {
                    send_raw_bytes(&mut g, &answer(r)).await;
                    break;
                }
                _ => return,
            }
        }
        while g.next().await.is_some() {}
    })
    .await
    .unwrap()
}

fn answer_with(body: ResponseBody) -> impl FnOnce(Request) -> Vec<u8> + Send + 'static {
    move |r| bytes_of(&Message::Response(Response { id: r.id, body })).to_vec()
}

async fn assert_violation<T: std::fmt::Debug>(
    session: &vmsync_transport::Session,
    result: Result<T, EndpointError>,
    needle: &str,
) {
    match result {
        Err(EndpointError::Protocol(what) | EndpointError::Disconnected(what)) => {
            assert!(
                what.contains(needle),
                "{what:?} does not mention {needle:?}"
            )
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let reason = session.closed().await;
    assert!(reason.contains(needle), "{reason:?}");
}

#[tokio::test]
async fn response_to_an_unknown_id() {
    let session = session_with_answer(|r| {
        bytes_of(&Message::Response(Response {
            id: r.id + 1000,
            body: ResponseBody::Pong,
        }))
        .to_vec()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    assert_violation(&session, r, "which is not pending").await;
}

/// A guest replaying an answer verbatim (the same id, the same body): the call it answered
/// takes it once; the copy matches no pending request and ends the session, so it can never
/// be taken for the answer to a later call.
#[tokio::test]
async fn a_replayed_answer_is_taken_once_and_its_copy_ends_the_session() {
    let session = session_with_answer(|r| {
        let once = bytes_of(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Transitioned(Ok(vec![Outcome::Applied])),
        }))
        .to_vec();
        [once.clone(), once].concat()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let change = Change {
        path: p("f"),
        expected: None,
        new: None,
    };
    let first = remote.transition(vec![change.clone()]).await;
    assert_eq!(first.unwrap(), vec![Outcome::Applied]);
    let reason = session.closed().await;
    assert!(reason.contains("which is not pending"), "{reason:?}");
    assert!(remote.transition(vec![change]).await.is_err());
}

#[tokio::test]
async fn wrong_response_kind() {
    let session = session_with_answer(answer_with(ResponseBody::Supplied(Ok(vec![])))).await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    assert_violation(&session, r, "answered ScanFull with Supply").await;
}

#[tokio::test]
async fn wrong_answer_count() {
    let session = session_with_answer(answer_with(ResponseBody::Manifests(Ok(vec![])))).await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.manifests(vec![(p("f"), meta_of(b"x"))]).await;
    assert_violation(&session, r, "answered 1 manifest requests with 0 results").await;
}

fn one_read() -> Vec<ChunkRead> {
    let data = vec![3u8; 2000];
    vec![ChunkRead {
        path: p("f"),
        chunk: ChunkRef {
            hash: hash_chunk(&data),
            offset: 0,
            len: 2000,
        },
    }]
}

#[tokio::test]
async fn chunk_that_does_not_hash_to_its_id() {
    let session = session_with_answer(|r| {
        let asked = match &r.body {
            RequestBody::ReadChunks { reads } => reads[0].read.chunk.hash,
            _ => panic!(),
        };
        let evil = vec![4u8; 2000];
        let mut chunk = encode_chunk(hash_chunk(&evil), &evil, 3);
        chunk.hash = asked;
        bytes_of(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Chunks(Ok(vec![Some(vmsync_protocol::WireContent::Whole(chunk))])),
        }))
        .to_vec()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.read_chunks(one_read()).await;
    assert_violation(&session, r, "sent a bad chunk").await;
}

#[tokio::test]
async fn chunk_for_another_read() {
    let session = session_with_answer(|r| {
        let other = vec![5u8; 2000];
        let chunk = encode_chunk(hash_chunk(&other), &other, 3);
        bytes_of(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Chunks(Ok(vec![Some(vmsync_protocol::WireContent::Whole(chunk))])),
        }))
        .to_vec()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.read_chunks(one_read()).await;
    assert_violation(&session, r, "for a read of").await;
}

#[tokio::test]
async fn invalid_scan_report_is_rejected_at_decode() {
    let report = ScanReport {
        root: None,
        entries: vec![(
            p("x"),
            Entry::Dir {
                mode: 0o4755,
                mtime: Default::default(),
            },
        )],
        problems: vec![],
        ignored: vec![],
        generation: None,
    };
    // Encode without validation (postcard directly), as a hostile guest would.
    let session = session_with_answer(move |r| {
        let body = postcard::to_allocvec(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Scanned(Ok(vmsync_protocol::messages::Scanned::new(
                report,
                vec![],
            ))),
        }))
        .unwrap();
        let mut bytes = frame_header(body.len() as u32, false).to_vec();
        bytes.extend_from_slice(&body);
        bytes
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    assert_violation(&session, r, "mode").await;
}

#[tokio::test]
async fn oversized_frame_from_the_guest() {
    let session = session_with_answer(|_| u32::MAX.to_be_bytes().to_vec()).await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    assert_violation(&session, r, "larger than").await;
}

#[tokio::test]
async fn guest_sends_a_hello_after_the_handshake() {
    let session =
        session_with_answer(|_| bytes_of(&Message::Hello(handshake::hello("g", vec![]))).to_vec())
            .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.scan(ScanScope::Full, ScanOptions::default()).await;
    assert_violation(&session, r, "sent Hello after the handshake").await;
    let _ = Hash::default();
}

// ---------------------------------------------------------------- hostile guest: chunk deltas

fn based_reads() -> Vec<vmsync_core::endpoint::DeltaRead> {
    let mut reads: Vec<_> = one_read()
        .into_iter()
        .map(|read| vmsync_core::endpoint::DeltaRead {
            read,
            base: Some(vmsync_core::delta::signature(&[1u8; 3000], 256)),
        })
        .collect();
    let mut plain = reads[0].clone();
    plain.read.path = p("g");
    plain.base = None;
    reads.push(plain);
    reads
}

/// A delta for a read that offered no base: the guest cannot mean it; the session ends.
#[tokio::test]
async fn delta_for_a_read_without_a_base() {
    let session = session_with_answer(|r| {
        let asked = match &r.body {
            RequestBody::ReadChunks { reads } => reads[1].read.chunk.hash,
            other => panic!("{other:?}"),
        };
        let delta = vmsync_protocol::encode_delta(asked, &[0x72, 0x73, 0x02, 0x36, 0], 0);
        bytes_of(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Chunks(Ok(vec![
                None,
                Some(vmsync_protocol::WireContent::Delta(delta)),
            ])),
        }))
        .to_vec()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.read_deltas(based_reads()).await;
    assert_violation(&session, r, "without a base").await;
}

/// A delta that decompresses to more than it declares.
#[tokio::test]
async fn delta_that_does_not_decode() {
    let session = session_with_answer(|r| {
        let asked = match &r.body {
            RequestBody::ReadChunks { reads } => reads[0].read.chunk.hash,
            other => panic!("{other:?}"),
        };
        let mut delta = vmsync_protocol::encode_delta(asked, &[7u8; 3000], 3);
        assert_eq!(delta.codec, vmsync_protocol::Codec::Zstd);
        delta.len = 100;
        bytes_of(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Chunks(Ok(vec![
                Some(vmsync_protocol::WireContent::Delta(delta)),
                None,
            ])),
        }))
        .to_vec()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.read_deltas(based_reads()).await;
    assert_violation(&session, r, "sent a bad delta").await;
}

/// "Still missing" for a chunk this side never supplied.
#[tokio::test]
async fn still_missing_chunk_that_was_never_supplied() {
    let session =
        session_with_answer(answer_with(ResponseBody::Supplied(Ok(vec![Hash([9; 32])])))).await;
    let mut remote = session.endpoint(0).unwrap();
    let data = vec![1u8; 100];
    let r = remote
        .supply(vec![(
            hash_chunk(&data),
            vmsync_core::endpoint::ChunkData::Delta(vec![0u8; 10]),
        )])
        .await;
    assert_violation(&session, r, "which was not supplied").await;
}

/// Whole chunks are supplied without waiting for the answer (it can only be "done" or an
/// error); a guest that claims one is still missing is caught by the next call.
#[tokio::test]
async fn still_missing_whole_chunk_is_caught_by_the_next_call() {
    let data = vec![1u8; 100];
    let hash = hash_chunk(&data);
    let session = session_with_answer(answer_with(ResponseBody::Supplied(Ok(vec![hash])))).await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote
        .supply(vec![(hash, vmsync_core::endpoint::ChunkData::Whole(data))])
        .await;
    assert_eq!(r, Ok(Vec::new()), "sent, not waited for");
    let r = remote.transition(Vec::new()).await;
    assert_violation(&session, r, "still missing").await;
}

/// Several supplies of whole chunks go out without waiting for their answers (the guest takes
/// the next while it writes one); a false "still missing" in the first is still caught, by the
/// next call that waits.
#[tokio::test]
async fn a_false_answer_among_supplies_in_flight_is_caught_by_the_next_call() {
    let data = vec![1u8; 100];
    let hash = hash_chunk(&data);
    let session = session_with_answer(answer_with(ResponseBody::Supplied(Ok(vec![hash])))).await;
    let mut remote = session.endpoint(0).unwrap();
    for i in 0..3 {
        let r = remote
            .supply(vec![(
                hash,
                vmsync_core::endpoint::ChunkData::Whole(data.clone()),
            )])
            .await;
        assert_eq!(r, Ok(Vec::new()), "supply {i}: sent, not waited for");
    }
    let r = remote.transition(Vec::new()).await;
    assert_violation(&session, r, "still missing").await;
}

/// `BaseUnknown` for a manifest sent in full: there was no base to not know.
#[tokio::test]
async fn base_unknown_for_a_full_manifest() {
    let session = session_with_answer(answer_with(ResponseBody::Staged(Ok(vec![
        vmsync_protocol::messages::StageAnswer::BaseUnknown,
    ]))))
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let data = b"x".to_vec();
    let r = remote
        .stage(vec![vmsync_core::endpoint::StageRequest {
            path: p("f"),
            meta: meta_of(&data),
            manifest: manifest_of(&data),
        }])
        .await;
    assert_violation(&session, r, "BaseUnknown").await;
}

/// A guest's problem reasons and error messages reach logs and `status`: whatever terminal
/// control they carry arrives escaped, on one line.
#[tokio::test]
async fn guest_text_arrives_escaped() {
    const EVIL: &str = "\u{1b}[2J\u{1b}]0;owned\u{7}\nforged: line \u{202e}txt.exe";
    let problem = vmsync_protocol::messages::WireProblem {
        path: p("f"),
        message: EVIL.into(),
    };
    let session =
        session_with_answer(answer_with(ResponseBody::Manifests(Ok(vec![Err(problem)])))).await;
    let mut remote = session.endpoint(0).unwrap();
    let answers = remote
        .manifests(vec![(p("f"), meta_of(b"x"))])
        .await
        .unwrap();
    let reason = match &answers[..] {
        [Err(problem)] => problem.reason.clone(),
        other => panic!("expected one problem, got {other:?}"),
    };
    assert_eq!(
        reason,
        "\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{a}forged: line \\u{202e}txt.exe"
    );

    let error = vmsync_protocol::messages::WireError {
        code: vmsync_protocol::messages::ErrorCode::Io,
        message: EVIL.into(),
    };
    let session = session_with_answer(answer_with(ResponseBody::Manifests(Err(error)))).await;
    let mut remote = session.endpoint(0).unwrap();
    match remote.manifests(vec![(p("f"), meta_of(b"x"))]).await {
        Err(EndpointError::Io(message)) => {
            assert!(!message.chars().any(char::is_control), "{message:?}");
            assert!(message.contains("forged: line"), "{message:?}");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- hash fields of the wrong length

/// `m` encoded and framed, with the 32 bytes of `h` (where they last occur) made `len` bytes
/// long: cut to their first `len`, or followed by `len - 32` more. A hash is a fixed 32-byte
/// field with no length on the wire, so this is what a hostile peer's short or long hash is.
fn with_hash_of_length(m: &Message, h: &Hash, len: usize) -> Vec<u8> {
    let mut body = postcard::to_allocvec(m).unwrap();
    let at = body
        .windows(32)
        .rposition(|w| w == h.as_bytes())
        .expect("the hash is in the message");
    if len < 32 {
        body.drain(at + len..at + 32);
    } else {
        let extra = vec![0x5a; len - 32];
        body.splice(at + 32..at + 32, extra);
    }
    let mut framed = frame_header(body.len() as u32, false).to_vec();
    framed.extend_from_slice(&body);
    framed
}

/// A host's request whose last field is a hash (a transition's file digest) sent short (none of
/// it, a 16-byte prefix, 31 bytes) or long (33 bytes): the message runs out inside the hash, or
/// a byte is left over; either way it does not decode, the session ends, and the endpoint never
/// sees the request.
#[tokio::test]
async fn a_request_with_a_hash_field_too_short_or_too_long_ends_the_session() {
    let meta = meta_of(b"a file");
    let request = Message::Request(Request {
        id: 1,
        share: 0,
        body: RequestBody::Transition {
            changes: vec![Change {
                path: p("f"),
                expected: None,
                new: Some(Entry::File(meta)),
            }],
        },
    });
    for len in [0, 16, 31, 33] {
        let guest = Fake::default();
        let bytes = with_hash_of_length(&request, &meta.digest, len);
        let r = server_result_after(guest.clone(), |host| async move {
            let mut host = raw_host_after_handshake(host.into_inner()).await;
            send_raw_bytes(&mut host, &bytes).await;
            host
        })
        .await;
        match (len, &r) {
            (0..=31, Err(TransportError::Codec(CodecError::Decode(_)))) => {}
            (33, Err(TransportError::Codec(CodecError::TrailingBytes { count: 1 }))) => {}
            _ => panic!("a {len}-byte digest: {r:?}"),
        }
        assert_eq!(
            guest.started.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a {len}-byte digest reached the endpoint"
        );
    }
}

/// A guest's answer whose last field is a hash (a chunk still missing after a supply) sent
/// short or long: it does not decode, the call fails and the session ends.
#[tokio::test]
async fn an_answer_with_a_hash_field_too_short_or_too_long_ends_the_session() {
    let data = vec![1u8; 100];
    let h = hash(&data);
    for (len, needle) in [
        (0, "does not decode"),
        (16, "does not decode"),
        (31, "does not decode"),
        (33, "stray bytes"),
    ] {
        let session = session_with_answer(move |r| {
            let answer = Message::Response(Response {
                id: r.id,
                body: ResponseBody::Supplied(Ok(vec![h])),
            });
            with_hash_of_length(&answer, &h, len)
        })
        .await;
        let mut remote = session.endpoint(0).unwrap();
        // A delta's supply waits for its answer (whole chunks are not waited for).
        let r = remote
            .supply(vec![(
                h,
                vmsync_core::endpoint::ChunkData::Delta(vec![0u8; 10]),
            )])
            .await;
        assert_violation(&session, r, needle).await;
    }
}

/// Nothing looks a chunk up by a prefix of its id: a chunk whose id differs from the one asked
/// for in its last byte alone (carrying the very bytes of the chunk asked for) is not taken for
/// it; the session ends.
#[tokio::test]
async fn a_chunk_whose_id_differs_from_the_one_asked_in_its_last_byte_is_refused() {
    let session = session_with_answer(|r| {
        let asked = match &r.body {
            RequestBody::ReadChunks { reads } => reads[0].read.chunk.hash,
            other => panic!("{other:?}"),
        };
        let data = vec![3u8; 2000];
        assert_eq!(hash_chunk(&data), asked);
        let mut near = asked;
        near.0[31] ^= 1;
        let chunk = encode_chunk(near, &data, 0);
        bytes_of(&Message::Response(Response {
            id: r.id,
            body: ResponseBody::Chunks(Ok(vec![Some(vmsync_protocol::WireContent::Whole(chunk))])),
        }))
        .to_vec()
    })
    .await;
    let mut remote = session.endpoint(0).unwrap();
    let r = remote.read_chunks(one_read()).await;
    assert_violation(&session, r, "for a read of").await;
}
