//! Text a peer wrote, made safe to print: a guest's error messages and problem reasons reach
//! logs, `status` and terminals, where a control character could forge a line, move the cursor
//! or recolour the screen, and a bidirectional override could make a line read as something
//! else. [`escape_text`] keeps printable text as it is and writes every such character as
//! `\u{…}`.

/// `s` with every control character (C0, DEL, C1) and every bidirectional formatting character
/// written as `\u{hex}`; everything else as it is.
pub fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on_and_keeps_the_rest() {
        let cases = [
            ("cannot open: No such file", "cannot open: No such file"),
            ("tab\there", "tab\\u{9}here"),
            ("line\nforged: line", "line\\u{a}forged: line"),
            ("\u{1b}[2J\u{1b}[31mred", "\\u{1b}[2J\\u{1b}[31mred"),
            ("del\u{7f}", "del\\u{7f}"),
            ("c1 csi \u{9b}31m", "c1 csi \\u{9b}31m"),
            ("bidi \u{202e}txt.exe", "bidi \\u{202e}txt.exe"),
            ("isolate \u{2066}x\u{2069}", "isolate \\u{2066}x\\u{2069}"),
            ("unicode stays: é ß 日本 🙂", "unicode stays: é ß 日本 🙂"),
            ("already \\x0a escaped", "already \\x0a escaped"),
            ("", ""),
        ];
        for (raw, shown) in cases {
            assert_eq!(escape_text(raw), shown, "{raw:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_result_never_holds_a_control_character(s in ".*") {
            let shown = escape_text(&s);
            proptest::prop_assert!(!shown.chars().any(needs_escape));
            if !s.chars().any(needs_escape) {
                proptest::prop_assert_eq!(shown, s);
            }
        }
    }
}
