//! The peer's stdin: chat lines and commands.
//!
//! Lines are read with a bounded codec, so an endless line costs nothing: it is rejected with a
//! clear error and reading goes on at the next newline. End of stdin does not stop the peer
//! (containers often run it without stdin); it just stops reading.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

use crate::frame::MAX_TEXT;
use crate::hook::{self, LabCommand};

/// One thing typed on stdin.
#[derive(Debug, PartialEq)]
pub enum Input {
    Say(String),
    Peers,
    /// `/stats`: counts of connections and traffic.
    Stats,
    Help,
    Quit,
    Lab(LabCommand),
    /// A line that was not accepted, with the reason.
    Rejected(String),
}

/// Reads stdin until its end, sending each line's meaning to `tx`: on the runtime's own thread
/// when stdin is a pipe or a socket, else through tokio's stdin thread.
pub async fn read_stdin(tx: mpsc::Sender<Input>, lab: bool) {
    match crate::stdio::Stdin::nonblocking() {
        Some(stdin) => read_lines(stdin, tx, lab).await,
        None => read_lines(tokio::io::stdin(), tx, lab).await,
    }
}

async fn read_lines(mut input: impl AsyncRead + Unpin, tx: mpsc::Sender<Input>, lab: bool) {
    let mut codec = LinesCodec::new_with_max_length(MAX_TEXT);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let eof = match input.read_buf(&mut buf).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                tracing::warn!("cannot read stdin: {e}");
                true
            }
        };
        loop {
            let next = if eof { codec.decode_eof(&mut buf) } else { codec.decode(&mut buf) };
            let input = match next {
                Ok(Some(line)) => parse_line(&line, lab),
                Ok(None) => break,
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    Some(Input::Rejected(format!("line longer than {MAX_TEXT} bytes: not sent")))
                }
                Err(LinesCodecError::Io(_)) => Some(Input::Rejected("line is not valid UTF-8: not sent".into())),
            };
            if let Some(input) = input
                && tx.send(input).await.is_err()
            {
                return;
            }
        }
        if eof {
            tracing::debug!("stdin closed; the peer keeps running");
            return;
        }
    }
}

/// The meaning of one line; None for an empty line.
pub fn parse_line(line: &str, lab: bool) -> Option<Input> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() {
        return None;
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return Some(Input::Say(format!("/{escaped}")));
    }
    let Some(command) = line.strip_prefix('/') else { return Some(Input::Say(line.to_owned())) };
    let (word, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
    Some(match word {
        "peers" => Input::Peers,
        "stats" => Input::Stats,
        "help" => Input::Help,
        "quit" | "exit" => Input::Quit,
        "lab" if lab => hook::parse_command(rest).map_or_else(Input::Rejected, Input::Lab),
        _ => {
            Input::Rejected(format!("unknown command /{word}: /help lists commands (start a line with // to send a /)"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_commands() {
        assert_eq!(parse_line("hello", false), Some(Input::Say("hello".into())));
        assert_eq!(parse_line("hello\r", false), Some(Input::Say("hello".into())));
        assert_eq!(parse_line("   ", false), None);
        assert_eq!(parse_line("/peers", false), Some(Input::Peers));
        assert_eq!(parse_line("/quit", false), Some(Input::Quit));
        assert_eq!(parse_line("//etc/hosts", false), Some(Input::Say("/etc/hosts".into())));
        assert!(matches!(parse_line("/lab cut x", false), Some(Input::Rejected(_))));
        assert!(matches!(parse_line("/lab cut x", true), Some(Input::Lab(_))));
        assert!(matches!(parse_line("/frobnicate", false), Some(Input::Rejected(_))));
    }

    #[tokio::test]
    async fn overlong_and_invalid_lines_are_rejected_and_reading_goes_on() {
        let mut data = b"one\n".to_vec();
        data.extend(vec![b'x'; MAX_TEXT * 3]);
        data.extend(b"\n\xff\xfe\ntwo\nthree-without-newline");
        let (tx, mut rx) = mpsc::channel(16);
        read_lines(&data[..], tx, false).await;
        let mut got = Vec::new();
        while let Some(i) = rx.recv().await {
            got.push(i);
        }
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], Input::Say("one".into()));
        assert!(matches!(got[1], Input::Rejected(ref why) if why.contains("longer")));
        assert!(matches!(got[2], Input::Rejected(ref why) if why.contains("UTF-8")));
        assert_eq!(got[3], Input::Say("two".into()));
        assert_eq!(got[4], Input::Say("three-without-newline".into()));
    }
}
