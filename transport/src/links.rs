//! Where a symlink really leads, judged without touching the disk.
//!
//! A snapshot is restored at real host paths, so a link's target is judged from the place the
//! link will sit, against the declared path it belongs to (a step's declared output, an
//! imported path): everything here is relative to that declared root. A link stays within
//! the root when its target, resolved lexically from the link's directory and through the
//! other links of the same tree (up to 40 hops), never climbs above the root and ends inside
//! it. Absolute targets never stay within. A link that *is* the declared root always leaves
//! it. Components that are not links count as plain directories.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Most links followed while resolving one target.
pub const MAX_HOPS: u32 = 40;

/// Whether the link at `link` (relative to the declared root) with `target` resolves inside
/// the root; `lookup` gives the target of any other link of the tree, by path relative to the
/// root.
pub fn stays_within(lookup: &dyn Fn(&Path) -> Option<PathBuf>, link: &Path, target: &Path) -> bool {
    let mut stack: Vec<OsString> = Vec::new();
    let mut comps = 0usize;
    for c in link.components() {
        match c {
            Component::Normal(n) => {
                stack.push(n.to_os_string());
                comps += 1;
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    if comps == 0 {
        // The link is the declared path itself: whatever it names is outside it.
        return false;
    }
    stack.pop();
    let mut hops = 0;
    walk(lookup, &mut stack, target, &mut hops)
}

fn walk(
    lookup: &dyn Fn(&Path) -> Option<PathBuf>,
    stack: &mut Vec<OsString>,
    target: &Path,
    hops: &mut u32,
) -> bool {
    for c in target.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
            Component::Normal(n) => {
                stack.push(n.to_os_string());
                let here: PathBuf = stack.iter().collect();
                if let Some(next) = lookup(&here) {
                    *hops += 1;
                    if *hops > MAX_HOPS {
                        return false;
                    }
                    stack.pop();
                    if !walk(lookup, stack, &next, hops) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// The first link of `links` (paths relative to the tree, with their targets) that does not
/// stay within `root` (a path relative to the tree): links outside `root` are not judged.
pub fn first_escape<'a>(links: &'a [(PathBuf, PathBuf)], root: &Path) -> Option<&'a (PathBuf, PathBuf)> {
    let under: Vec<(PathBuf, &PathBuf)> =
        links.iter().filter_map(|(p, t)| p.strip_prefix(root).ok().map(|r| (r.to_path_buf(), t))).collect();
    let map: std::collections::HashMap<&Path, &PathBuf> =
        under.iter().map(|(r, t)| (r.as_path(), *t)).collect();
    let lookup = |p: &Path| map.get(p).map(|t| (*t).clone());
    links.iter().find(|(p, t)| match p.strip_prefix(root) {
        Ok(r) => !stays_within(&lookup, r, t),
        Err(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(links: &[(&str, &str)], root: &str, escaping: Option<&str>) {
        let links: Vec<(PathBuf, PathBuf)> =
            links.iter().map(|(p, t)| (PathBuf::from(p), PathBuf::from(t))).collect();
        let got = first_escape(&links, Path::new(root)).map(|(p, _)| p.to_string_lossy().into_owned());
        assert_eq!(got.as_deref(), escaping, "links {links:?} under {root}");
    }

    #[test]
    fn links_are_judged_from_where_they_sit() {
        check(&[("data/out/a", "b")], "data/out", None);
        check(&[("data/out/sub/a", "../b")], "data/out", None);
        check(&[("data/out/a", "../../etc/shadow")], "data/out", Some("data/out/a"));
        // Inside the tree, but outside the declared output: refused.
        check(&[("data/out/a", "../other/x")], "data/out", Some("data/out/a"));
        check(&[("data/out/a", "/etc/passwd")], "data/out", Some("data/out/a"));
        // The declared path itself as a link.
        check(&[("data/out", "elsewhere")], "data/out", Some("data/out"));
        // Through another link of the tree.
        check(&[("data/out/up", ".."), ("data/out/a", "up/x")], "data/out", Some("data/out/up"));
        check(&[("data/out/d", "sub"), ("data/out/a", "d/../../x")], "data/out", Some("data/out/a"));
        check(&[("data/out/loop", "loop")], "data/out", Some("data/out/loop"));
        // Links outside the root are not judged.
        check(&[("data/other/a", "../../../x")], "data/out", None);
        check(&[("data/out/a", "./b/./c")], "data/out", None);
    }
}
