//! `transport::envelope::EnvelopeReader` (Connect streaming and gRPC framing): the body
//! arrives in fuzzer-chosen chunks, optionally ending with a transport error; the
//! envelopes read must equal a one-shot reference parse of the same bytes, whatever
//! the chunking.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http_body::Frame;

use guestd::transport::Code;
use guestd::transport::envelope::EnvelopeReader;

#[derive(Arbitrary, Debug)]
struct Input {
    max_message_bytes: u16,
    splits: Vec<u8>,
    body_error: bool,
    data: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum End {
    Clean,
    Incomplete,
    TooLarge,
    Canceled,
}

/// The whole body at once: envelopes, then how the body ends.
fn reference(data: &[u8], max: usize, body_error: bool) -> (Vec<(u8, Vec<u8>)>, End) {
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        if rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len > max {
                return (out, End::TooLarge);
            }
            if rest.len() >= 5 + len {
                out.push((rest[0], rest[5..5 + len].to_vec()));
                rest = &rest[5 + len..];
                continue;
            }
        }
        if body_error {
            return (out, End::Canceled);
        }
        return (
            out,
            if rest.is_empty() {
                End::Clean
            } else {
                End::Incomplete
            },
        );
    }
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let max = usize::from(input.max_message_bytes);
    let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = Vec::new();
    let mut rest = &input.data[..];
    let mut i = 0;
    while !rest.is_empty() {
        // A zero split is an empty data frame (allowed on the wire).
        let n = input
            .splits
            .get(i)
            .map_or(rest.len(), |&s| usize::from(s))
            .min(rest.len());
        i += 1;
        frames.push(Ok(Frame::data(Bytes::copy_from_slice(&rest[..n]))));
        rest = &rest[n..];
        if i > 4096 {
            frames.push(Ok(Frame::data(Bytes::copy_from_slice(rest))));
            break;
        }
    }
    if input.body_error {
        frames.push(Err(std::io::Error::other("connection reset")));
    }
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let mut reader = EnvelopeReader::new(body, max);
    let (expected, expected_end) = reference(&input.data, max, input.body_error);
    let mut got = Vec::new();
    let end = crate::http::block_on(async {
        loop {
            match reader.next().await {
                Ok(Some(env)) => got.push((env.flags, env.payload.to_vec())),
                Ok(None) => return End::Clean,
                Err(e) => {
                    assert!(!e.message.is_empty(), "error without a message");
                    return match e.code {
                        Code::InvalidArgument => End::Incomplete,
                        Code::ResourceExhausted => End::TooLarge,
                        Code::Canceled => End::Canceled,
                        other => panic!("unexpected code {other:?}: {}", e.message),
                    };
                }
            }
        }
    });
    assert_eq!(got, expected, "envelopes differ from the one-shot parse");
    assert_eq!(
        end, expected_end,
        "the body's end differs from the one-shot parse"
    );
}
