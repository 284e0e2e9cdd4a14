//! `transport::rpc::decode` for every request message of `process.Process` and
//! `filesystem.Filesystem`, in both codecs (Connect/gRPC JSON via pbjson, binary via
//! prost). What decodes must survive our own encoding in both codecs unchanged.

use std::fmt::Debug;

use guestd::proto::filesystem as fs;
use guestd::proto::process as pr;
use guestd::transport::rpc::{Codec, RpcMessage, decode, encode};

fn check<T: RpcMessage + PartialEq + Debug>(codec: Codec, raw: &[u8]) {
    let msg: T = match decode(codec, raw) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.message.is_empty());
            return;
        }
    };
    let proto = encode(Codec::Proto, &msg).expect("proto encoding cannot fail");
    let back: T = decode(Codec::Proto, &proto).expect("our own proto encoding must decode");
    assert_eq!(back, msg, "proto round trip changed the message");
    // JSON encoding can refuse values JSON cannot carry; what it writes must read back.
    if let Ok(json) = encode(Codec::Json, &msg) {
        let back: T = decode(Codec::Json, &json).unwrap_or_else(|e| {
            panic!(
                "our own JSON {:?} does not decode: {}",
                String::from_utf8_lossy(&json),
                e.message
            )
        });
        assert_eq!(back, msg, "JSON round trip changed the message");
    }
}

/// The first byte picks the message type and codec; the rest is the message.
pub fn run(data: &[u8]) {
    let Some((&sel, raw)) = data.split_first() else {
        return;
    };
    let codec = if sel & 0x80 == 0 {
        Codec::Json
    } else {
        Codec::Proto
    };
    match sel & 0x7f {
        0 => check::<pr::ListRequest>(codec, raw),
        1 => check::<pr::ConnectRequest>(codec, raw),
        2 => check::<pr::StartRequest>(codec, raw),
        3 => check::<pr::UpdateRequest>(codec, raw),
        4 => check::<pr::StreamInputRequest>(codec, raw),
        5 => check::<pr::SendInputRequest>(codec, raw),
        6 => check::<pr::SendSignalRequest>(codec, raw),
        7 => check::<pr::CloseStdinRequest>(codec, raw),
        8 => check::<fs::StatRequest>(codec, raw),
        9 => check::<fs::MakeDirRequest>(codec, raw),
        10 => check::<fs::MoveRequest>(codec, raw),
        11 => check::<fs::ListDirRequest>(codec, raw),
        12 => check::<fs::RemoveRequest>(codec, raw),
        13 => check::<fs::WatchDirRequest>(codec, raw),
        14 => check::<fs::CreateWatcherRequest>(codec, raw),
        15 => check::<fs::GetWatcherEventsRequest>(codec, raw),
        16 => check::<fs::RemoveWatcherRequest>(codec, raw),
        _ => {}
    }
}
