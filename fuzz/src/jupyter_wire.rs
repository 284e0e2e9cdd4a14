//! Jupyter wire messages (`kernel::wire::Signer::decode`): routing identities, the
//! `<IDS|MSG>` delimiter, HMAC-SHA256 signatures (the harness signs the parts when
//! asked, so the JSON parsing behind the check is reached), the four JSON parts and
//! buffers. A decoded message re-encodes to the same message; fed to the execution
//! tracker (`kernel::exec::Tracker`) it yields outputs whose `/execute` lines
//! (`code_interpreter::encode_line`) are single-line, ASCII-only JSON objects.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;

use guestd::code_interpreter::encode_line;
use guestd::kernel::exec::Tracker;
use guestd::kernel::wire::Signer;

#[derive(Arbitrary, Debug)]
struct Input {
    key: Vec<u8>,
    ids: Vec<Vec<u8>>,
    /// Sign the four JSON parts with `key` (else `signature` is sent as is).
    sign: bool,
    signature: Vec<u8>,
    header: Vec<u8>,
    parent: Vec<u8>,
    metadata: Vec<u8>,
    content: Vec<u8>,
    buffers: Vec<Vec<u8>>,
    /// Drop trailing frames (fewer than the five required parts).
    truncate: u8,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let signer = Signer::new(&input.key);
    let parts: [&[u8]; 4] = [
        &input.header,
        &input.parent,
        &input.metadata,
        &input.content,
    ];
    let sig = if input.sign {
        signer.sign(&parts).into_bytes()
    } else {
        input.signature.clone()
    };
    let mut frames: Vec<Bytes> = input.ids.iter().map(|i| Bytes::from(i.clone())).collect();
    frames.push(Bytes::from_static(b"<IDS|MSG>"));
    frames.push(Bytes::from(sig));
    for p in parts {
        frames.push(Bytes::copy_from_slice(p));
    }
    frames.extend(input.buffers.iter().map(|b| Bytes::from(b.clone())));
    let keep = frames.len().saturating_sub(usize::from(input.truncate % 8));
    frames.truncate(keep);

    let mut msg = match signer.decode(&frames) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let again = signer
        .decode(&signer.encode(&msg))
        .expect("our own encoding decodes");
    assert_eq!(again.header, msg.header, "header changed in a round trip");
    assert_eq!(again.parent, msg.parent, "parent changed in a round trip");
    assert_eq!(
        again.metadata, msg.metadata,
        "metadata changed in a round trip"
    );
    assert_eq!(
        again.content, msg.content,
        "content changed in a round trip"
    );

    let mut tracker = Tracker::new(msg.parent_id().unwrap_or("request"));
    let mut outputs = tracker.on_iopub(&mut msg);
    tracker.on_shell(&msg);
    outputs.extend(tracker.finish());
    for out in &outputs {
        let line = encode_line(out);
        assert_eq!(line.last(), Some(&b'\n'), "line without a newline");
        let body = &line[..line.len() - 1];
        assert!(body.is_ascii(), "non-ASCII /execute line");
        assert!(!body.contains(&b'\n'), "newline inside an /execute line");
        let v: serde_json::Value = serde_json::from_slice(body).expect("line is JSON");
        assert!(
            v.get("type").and_then(|t| t.as_str()).is_some(),
            "line without a type"
        );
    }
}
