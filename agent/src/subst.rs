//! Path substitution: when a step's view is not mounted at the original paths, each declared
//! path in the command text is replaced by its counterpart in the view, in one pass, longest
//! path first, and only where the path stands on its own: `/data/a` is rewritten in
//! `cat /data/a`, `"/data/a"`, `--in=/data/a` and `/data/a/x`, never in `/data/ab`,
//! `/data/a.bam` or `x/data/a`.

/// Characters that may end a path in shell text (beside the end of the text and `/`).
fn ends_path(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '/' | '\'' | '"' | '`' | ';' | '|' | '&' | '(' | ')' | '<' | '>' | ',' | ':' | '}' | ']' | '='
        )
}

/// Characters that may stand before a path.
fn starts_path(c: char) -> bool {
    c.is_whitespace()
        || matches!(c, '\'' | '"' | '`' | '=' | ':' | ';' | '|' | '&' | '(' | '<' | '>' | '{' | '[' | ',')
}

/// Rewrites `text`, replacing each `from` by its `to` (see the module docs).
pub fn substitute(text: &str, pairs: &[(String, String)]) -> String {
    let mut sorted: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(f, t)| (f.trim_end_matches('/'), t.trim_end_matches('/')))
        .filter(|(f, _)| !f.is_empty())
        .collect();
    sorted.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut prev: Option<char> = None;
    'scan: while i < text.len() {
        if prev.is_none_or(starts_path) {
            let rest = &text[i..];
            for (from, to) in &sorted {
                if let Some(after) = rest.strip_prefix(from)
                    && after.chars().next().is_none_or(ends_path)
                {
                    out.push_str(to);
                    i += from.len();
                    prev = from.chars().last();
                    continue 'scan;
                }
            }
        }
        let Some(c) = text[i..].chars().next() else { break };
        out.push(c);
        i += c.len_utf8();
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &str) {
        let pairs: Vec<(String, String)> = [
            ("/data/a", "/m/data/a"),
            ("/data/a/b", "/s/b"),
            ("/out/my file.txt", "/s/my file.txt"),
            ("/res/ü.txt", "/m/res/ü.txt"),
            ("/ref/", "/m/ref"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(substitute(text, &pairs), expected, "input: {text:?}");
    }

    #[test]
    fn substitution_table() {
        check("cat /data/a", "cat /m/data/a");
        check("cat /data/ab", "cat /data/ab");
        check("cat /data/a.bam", "cat /data/a.bam");
        check("cat /data/a/x", "cat /m/data/a/x");
        check("cat /data/a/b", "cat /s/b");
        check("cat /data/a/bc", "cat /m/data/a/bc");
        check("cat x/data/a", "cat x/data/a");
        check("cat /mnt/data/a", "cat /mnt/data/a");
        check("tool --in=/data/a>/data/a/b", "tool --in=/m/data/a>/s/b");
        check("echo \"/data/a\" '/data/a/b'", "echo \"/m/data/a\" '/s/b'");
        check("cp /data/a \"/out/my file.txt\"", "cp /m/data/a \"/s/my file.txt\"");
        check("wc /res/ü.txt;ls /ref", "wc /m/res/ü.txt;ls /m/ref");
        check("ls /ref/g.fa", "ls /m/ref/g.fa");
        check("PATH=/data/a:$PATH", "PATH=/m/data/a:$PATH");
        check("$(cat /data/a)", "$(cat /m/data/a)");
        check("/data/a", "/m/data/a");
        check("/data/a/", "/m/data/a/");
        check("", "");
        check("no paths here", "no paths here");
        check("${X}/data/a", "${X}/data/a");
        check("ünï /data/a", "ünï /m/data/a");
    }

    #[test]
    fn replacement_is_not_rescanned() {
        let pairs = vec![("/a".to_string(), "/b".to_string()), ("/b".to_string(), "/c".to_string())];
        assert_eq!(substitute("/a /b", &pairs), "/b /c");
    }
}
