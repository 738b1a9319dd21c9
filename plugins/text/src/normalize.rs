//! TorchServe's text preprocessing (`TextClassifier.preprocess` of TorchServe 0.12.0), step by
//! step as its Python does it, so that the same text gives the same tokens:
//!
//! 1. remove HTML tags and entities (`<.*?>|&([a-z0-9]+|#[0-9]{1,6}|#x[0-9a-f]{1,6});`);
//! 2. lowercase (Python's `str.lower`, Unicode's full mappings);
//! 3. expand English contractions ([`crate::contractions`]), then drop every `'`;
//! 4. drop accents: NFKD, then every character that is not ASCII;
//! 5. drop ASCII punctuation (Python's `string.punctuation`);
//! 6. split on whitespace (torchtext's `basic_english`, which after the steps above only
//!    lowercases again and collapses whitespace);
//! 7. add the n-grams (`ngrams_iterator`: the tokens, then each run of 2..=n joined by a space).
//!
//! Steps 3–5 are ASCII after step 4; step 6 splits on Python's whitespace (`str.isspace`),
//! which counts the separators U+001C–U+001F too.

use unicode_normalization::UnicodeNormalization;

use crate::contractions::CONTRACTIONS;

/// The tokens and n-grams of `text`, as TorchServe's `TextClassifier` makes them with
/// `ngrams` (its class attribute is 2).
pub fn tokens(text: &str, ngrams: usize) -> Vec<String> {
    let text = remove_html(text);
    let text = text.to_lowercase();
    let text = expand_contractions(&text);
    // basic_english lowercases again: NFKD turns compatibility capitals (mathematical
    // letters, ℌ, ᴬ), which `str.lower` leaves alone, into ASCII capitals.
    let text: String = text
        .nfkd()
        .filter(char::is_ascii)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let text: String = text.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    let words: Vec<&str> = text
        .split(is_python_space)
        .filter(|w| !w.is_empty())
        .collect();
    with_ngrams(&words, ngrams)
}

/// Python's `str.isspace` on the characters that remain after step 4 (ASCII).
fn is_python_space(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c' | '\x1c'..='\x1f'
    )
}

/// The words, then every run of 2..=`n` consecutive words joined by a space.
pub fn with_ngrams(words: &[&str], n: usize) -> Vec<String> {
    let mut out: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
    for size in 2..=n {
        out.extend(words.windows(size).map(|w| w.join(" ")));
    }
    out
}

/// TorchServe's `CLEANUP_REGEX` removed: `<`, the fewest characters other than a newline,
/// `>`; or `&` and an entity name (`[a-z0-9]+`), a decimal (`#` and 1–6 digits) or a hex
/// (`#x` and 1–6 of `[0-9a-f]`) reference, then `;`.
fn remove_html(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut kept = 0;
    while i < bytes.len() {
        let end = match bytes[i] {
            b'<' => bytes[i + 1..]
                .iter()
                .position(|&b| b == b'>' || b == b'\n')
                .filter(|&p| bytes[i + 1 + p] == b'>')
                .map(|p| i + 2 + p),
            b'&' => entity_end(&bytes[i + 1..]).map(|n| i + 1 + n),
            _ => None,
        };
        match end {
            Some(end) => {
                out.push_str(&text[kept..i]);
                i = end;
                kept = end;
            }
            None => i += 1,
        }
    }
    out.push_str(&text[kept..]);
    out
}

/// The length of an entity after its `&`, `;` included, if one starts there.
fn entity_end(rest: &[u8]) -> Option<usize> {
    let run = |from: usize, ok: fn(&u8) -> bool| rest[from..].iter().take_while(|b| ok(b)).count();
    let name = run(0, |b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name > 0 && rest.get(name) == Some(&b';') {
        return Some(name + 1);
    }
    if rest.first() != Some(&b'#') {
        return None;
    }
    let digits = run(1, u8::is_ascii_digit);
    if (1..=6).contains(&digits) && rest.get(1 + digits) == Some(&b';') {
        return Some(digits + 2);
    }
    if rest.get(1) == Some(&b'x') {
        let hex = run(2, |b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        if (1..=6).contains(&hex) && rest.get(2 + hex) == Some(&b';') {
            return Some(hex + 3);
        }
    }
    None
}

/// Contractions expanded (leftmost first; at one place the first key in TorchServe's order
/// that matches, ignoring ASCII case), keeping the matched text's first character, then every
/// `'` removed.
fn expand_contractions(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut i = 0;
    while i < bytes.len() {
        let found = CONTRACTIONS.iter().find(|(key, _)| {
            bytes
                .get(i..i + key.len())
                .is_some_and(|b| b.eq_ignore_ascii_case(key.as_bytes()))
        });
        match found {
            Some((key, _)) => {
                let matched = &text[i..i + key.len()];
                // TorchServe looks the matched text up as it is, then lowercased.
                let expansion = CONTRACTIONS
                    .iter()
                    .find(|(k, _)| *k == matched)
                    .or_else(|| {
                        let lower = matched.to_lowercase();
                        CONTRACTIONS.iter().find(|(k, _)| *k == lower)
                    })
                    .map_or(*key, |(_, v)| *v);
                let first = matched.chars().next().unwrap_or_default();
                out.push(first);
                out.push_str(expansion.get(1..).unwrap_or_default());
                i += key.len();
            }
            None => {
                let c = text[i..].chars().next().unwrap_or_default();
                out.push(c);
                i += c.len_utf8().max(1);
            }
        }
    }
    out.replace('\'', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_removed_as_torchserves_pattern_removes_it() {
        assert_eq!(remove_html("<p>a <b>b</b></p>"), "a b");
        assert_eq!(
            remove_html("a &amp; b &#8212; c &#x27;d&#x27;"),
            "a  b  c d"
        );
        // No `>` before the line ends, a 7-digit reference, an upper-case entity: kept.
        assert_eq!(remove_html("a < b\n> c"), "a < b\n> c");
        assert_eq!(remove_html("&#1234567; &AMP; &;"), "&#1234567; &AMP; &;");
        assert_eq!(remove_html("x<>y"), "xy");
    }

    #[test]
    fn contractions_expand_in_torchserves_order() {
        assert_eq!(expand_contractions("i can't've"), "i cannotve");
        assert_eq!(
            expand_contractions("i'd say they'd"),
            "i would say they would"
        );
        assert_eq!(
            expand_contractions("it's rock 'n' roll"),
            "it is rock n roll"
        );
    }

    #[test]
    fn tokens_and_bigrams() {
        assert_eq!(
            tokens("Here we ARE!", 2),
            ["here", "we", "are", "here we", "we are"]
        );
        assert_eq!(tokens("Café\u{a0}naïve", 1), ["cafe", "naive"]);
        assert_eq!(tokens("𝐁𝐞𝐚𝐫𝐬 ℌello ᴬ", 1), ["bears", "hello", "a"]);
        assert!(tokens("!!! ...", 2).is_empty());
    }
}
