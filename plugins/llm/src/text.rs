//! Turning generated tokens into text as they come: incremental detokenization that never
//! emits half a UTF-8 character, and `stop` strings that are cut out and never streamed.
//!
//! Each token costs a decode of a short window, not of the whole sequence: the window starts
//! at the tokens that produced the previous piece (so that decoders which treat the first
//! token specially, such as SentencePiece's leading space, see the same context), and a piece
//! is released once the window decodes to more than its old part without ending in half a
//! character.

use cresset_torch::tokenizers::Tokenizer;

/// The text of one sequence, released piece by piece.
pub struct TextStream {
    ids: Vec<u32>,
    /// Tokens before this are only context for decoding the window.
    prefix_offset: usize,
    /// Tokens before this have been turned into `text`.
    read_offset: usize,
    /// Bytes of `text` already released.
    released: usize,
    stops: Vec<String>,
    /// The longest stop string, in characters: text that could still become one is held back.
    hold: usize,
    /// Set when a stop string was found; the text ends before it.
    stopped: bool,
    text: String,
}

impl TextStream {
    /// A stream that ends at the first of `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        let hold = stops.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            released: 0,
            stops,
            hold,
            stopped: false,
            text: String::new(),
        }
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Add a token; returns the text that can be released now (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(id);
        let searched_from = self.text.len();
        if !self.advance(tokenizer, false) {
            return String::new();
        }
        if self.cut_at_stop(searched_from) {
            return self.release(self.text.len());
        }
        // Hold back the last `hold - 1` characters: they could still begin a stop string.
        let keep = self.hold.saturating_sub(1);
        let upto = if keep == 0 {
            self.text.len()
        } else {
            self.text
                .char_indices()
                .rev()
                .nth(keep - 1)
                .map_or(0, |(i, _)| i)
        };
        self.release(upto)
    }

    /// Release everything left (at the end of generation).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        if !self.stopped {
            let searched_from = self.text.len();
            self.advance(tokenizer, true);
            self.cut_at_stop(searched_from);
        }
        self.release(self.text.len())
    }

    /// The whole text so far (released or not).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Decode the window and append what it adds to `text`. Unless `last`, wait while the
    /// window ends in half a character (a trailing replacement character) or adds nothing.
    fn advance(&mut self, tokenizer: &Tokenizer, last: bool) -> bool {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let window = decode(&self.ids[self.prefix_offset..]);
        let added = match window.strip_prefix(prefix.as_str()) {
            Some(added) => added,
            // The decoder rewrote the prefix (rare): fall back to the whole sequence.
            None => {
                let whole = decode(&self.ids);
                let whole = if last {
                    whole
                } else {
                    whole.trim_end_matches('\u{FFFD}').to_owned()
                };
                if whole.len() <= self.text.len() || !whole.starts_with(self.text.as_str()) {
                    return false;
                }
                self.text = whole;
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return true;
            }
        };
        if added.is_empty() || (!last && added.ends_with('\u{FFFD}')) {
            return false;
        }
        self.text.push_str(added);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        true
    }

    /// Look for a stop string in the text from where it could begin given that the text up to
    /// `searched_from` held none; cut the text there.
    fn cut_at_stop(&mut self, searched_from: usize) -> bool {
        let mut start = searched_from;
        for _ in 0..self.hold {
            match self.text[..start].char_indices().next_back() {
                Some((i, _)) => start = i,
                None => break,
            }
        }
        let tail = &self.text[start..];
        let cut = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| tail.find(s.as_str()))
            .min();
        match cut {
            Some(at) => {
                self.text.truncate(start + at);
                self.stopped = true;
                true
            }
            None => false,
        }
    }

    fn release(&mut self, upto: usize) -> String {
        if upto <= self.released {
            return String::new();
        }
        let piece = self.text[self.released..upto].to_owned();
        self.released = upto;
        piece
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tokenizer(fixture: &str) -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/generated")
            .join(fixture);
        cresset_torch::load_tokenizer(&dir).expect("run `make models`")
    }

    const TEXT: &str =
        "Héllo wörld! 東京は晴れ 🌤️ — naïve café, 12345 tokens; \"quotes\"\n\tand  spaces.";

    #[test]
    fn pieces_add_up_to_the_whole_decode_for_every_tokenizer() {
        for fixture in ["llm/llama-gqa-tied", "llm/bloom-tiny", "nlp/gpt2"] {
            let tok = tokenizer(fixture);
            let ids = tok.encode(TEXT, false).expect("encode").get_ids().to_vec();
            let mut stream = TextStream::new(Vec::new());
            let mut out = String::new();
            for &id in &ids {
                let piece = stream.push(&tok, id);
                assert!(
                    !piece.contains('\u{FFFD}') || TEXT.contains('\u{FFFD}'),
                    "{fixture}"
                );
                out.push_str(&piece);
            }
            out.push_str(&stream.finish(&tok));
            assert_eq!(out, tok.decode(&ids, true).expect("decode"), "{fixture}");
            assert_eq!(stream.text(), out, "{fixture}");
        }
    }

    #[test]
    fn stop_strings_are_cut_and_never_released() {
        let tok = tokenizer("nlp/gpt2");
        let ids = tok.encode(TEXT, false).expect("encode").get_ids().to_vec();
        let mut stream = TextStream::new(vec!["café".into(), "東京".into()]);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&stream.push(&tok, id));
            if stream.stopped() {
                break;
            }
        }
        out.push_str(&stream.finish(&tok));
        assert!(stream.stopped());
        assert_eq!(out, "Héllo wörld! ");
    }
}
