//! The chat view on a terminal: the line being typed stays whole.
//!
//! When stdin and stdout are both a terminal (and not `--json`), rustyline reads what is typed
//! on a thread of its own, with line editing and history: arrow and control keys edit the line
//! and are never sent as text. What the peer shows (lines of others, joins, notices) is printed
//! above the line being typed through rustyline's external printer, which redraws the prompt
//! and the half-typed line below it. The prompt, `you> `, stays in front of each line sent, so
//! your own lines are marked in the scrollback. Off a terminal (pipes, containers without a
//! tty, `--json`) the peer reads and writes lines as before (crate::console, crate::output).

use std::io::IsTerminal;

use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter};
use tokio::sync::mpsc;

use crate::console::{Input, parse_line};

/// Prints lines above the line being typed.
pub type Printer = Box<dyn ExternalPrinter + Send>;

/// Whether the chat view should be the terminal one.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Starts reading the terminal on a thread of its own, sending what is typed to `tx`; returns
/// the printer for what is shown. Ctrl-C and Ctrl-D leave (as `/quit`).
pub fn open(tx: mpsc::Sender<Input>, lab: bool, prompt: String) -> anyhow::Result<Printer> {
    let mut editor = DefaultEditor::new()?;
    let printer = editor.create_external_printer()?;
    std::thread::Builder::new().name("terminal".into()).spawn(move || {
        loop {
            let input = match editor.readline(&prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    parse_line(&line, lab)
                }
                Err(ReadlineError::Interrupted | ReadlineError::Eof) => Some(Input::Quit),
                Err(e) => {
                    tracing::warn!("cannot read the terminal: {e}");
                    Some(Input::Quit)
                }
            };
            let quit = input == Some(Input::Quit);
            if let Some(input) = input
                && tx.blocking_send(input).is_err()
            {
                return;
            }
            if quit {
                return;
            }
        }
    })?;
    Ok(Box::new(printer))
}
