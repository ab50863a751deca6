//! Arbitrary bytes into the frame decoder, each frame into message parsing: never a panic, and
//! never more than one frame held.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshlab::frame::{self, MAX_FRAME, Message};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = frame::codec();
    // Feed in two pieces, split where the first byte says, to exercise partial frames.
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let mut buf = BytesMut::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(payload)) => {
                    let _ = Message::decode(&payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= MAX_FRAME + 4 + data.len(), "the decoder grew past one frame");
    }
});
