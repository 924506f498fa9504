//! Environment lists (`- FOO=bar`) and their expansion.
//!
//! The seed's manifest: each entry's value may use `$FOO` and `${FOO}`, expanded against the
//! environment as it stands at that entry (the base environment, then the entries before it,
//! in order), so `FOO=prefix$FOO` extends an earlier `FOO`. Overlays' lists are merged by
//! applying them in order; a command's own `env` applies after the top-level one.
//!
//! A name is `[A-Za-z_][A-Za-z0-9_]*`. An unset variable expands to nothing, as in a shell. A
//! `$` followed by anything else (`$1`, `$$`, a trailing `$`) stays as it is. An unclosed or
//! empty `${` is an error naming the entry.

use std::collections::BTreeMap;

/// An environment: names to values, in a stable order.
pub type Env = BTreeMap<String, String>;

/// An entry that does not parse, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("env entry '{0}' is not NAME=VALUE")]
    NotAssignment(String),
    #[error("env entry '{0}': '{1}' is not a variable name")]
    BadName(String, String),
    #[error("env entry '{0}': '${{' is not closed by '}}'")]
    Unclosed(String),
    #[error("env entry '{0}': '${{{1}}}' is not a variable name")]
    BadBraced(String, String),
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `s` is a variable name.
pub fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

/// Expands `$NAME` and `${NAME}` in `value` against `env`. `entry` names the entry in errors.
pub fn expand(value: &str, env: &Env, entry: &str) -> Result<String, EnvError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| EnvError::Unclosed(entry.to_string()))?;
            let name = &braced[..end];
            if !is_name(name) {
                return Err(EnvError::BadBraced(entry.to_string(), name.to_string()));
            }
            out.push_str(env.get(name).map_or("", String::as_str));
            rest = &braced[end + 1..];
        } else if after.starts_with(is_name_start) {
            let end = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
            out.push_str(env.get(&after[..end]).map_or("", String::as_str));
            rest = &after[end..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Splits `NAME=VALUE` (the value may contain `=`).
pub fn split_entry(entry: &str) -> Result<(&str, &str), EnvError> {
    let (name, value) = entry
        .split_once('=')
        .ok_or_else(|| EnvError::NotAssignment(entry.to_string()))?;
    if !is_name(name) {
        return Err(EnvError::BadName(entry.to_string(), name.to_string()));
    }
    Ok((name, value))
}

/// Checks a list's entries without expanding them (for a definition read before its base
/// environment is known).
pub fn check(entries: &[String]) -> Result<(), EnvError> {
    for e in entries {
        let (_, value) = split_entry(e)?;
        expand(value, &Env::new(), e)?;
    }
    Ok(())
}

/// Applies `entries` to `env` in order, each expanded against the environment so far.
pub fn apply(env: &mut Env, entries: &[String]) -> Result<(), EnvError> {
    for e in entries {
        let (name, value) = split_entry(e)?;
        let v = expand(value, env, e)?;
        env.insert(name.to_string(), v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_seeds_example_gives_prefixbarsuffix() {
        let mut env = Env::new();
        apply(
            &mut env,
            &list(&["FOO=bar", "FOO=prefix$FOO", "FOO=${FOO}suffix"]),
        )
        .unwrap();
        assert_eq!(env["FOO"], "prefixbarsuffix");
    }

    #[test]
    fn expansion_reads_the_base_and_earlier_entries_only() {
        let mut env = Env::from([("HOME".to_string(), "/home/u".to_string())]);
        apply(
            &mut env,
            &list(&[
                "A=$HOME/a",
                "B=${A}/b:$LATER:$UNSET",
                "LATER=x",
                "C=a=b=c",
                "D=$1 $$ cost$ ${A}x$Ax",
                "E=",
            ]),
        )
        .unwrap();
        assert_eq!(env["A"], "/home/u/a");
        assert_eq!(env["B"], "/home/u/a/b::");
        assert_eq!(env["C"], "a=b=c");
        assert_eq!(env["D"], "$1 $$ cost$ /home/u/ax");
        assert_eq!(env["E"], "");
    }

    #[test]
    fn bad_entries_are_named() {
        let err = |e: &str| apply(&mut Env::new(), &list(&[e])).unwrap_err().to_string();
        assert_eq!(err("FOO"), "env entry 'FOO' is not NAME=VALUE");
        assert_eq!(err("1X=a"), "env entry '1X=a': '1X' is not a variable name");
        assert_eq!(err("=a"), "env entry '=a': '' is not a variable name");
        assert_eq!(err("A=${B"), "env entry 'A=${B': '${' is not closed by '}'");
        assert_eq!(
            err("A=${}"),
            "env entry 'A=${}': '${}' is not a variable name"
        );
        assert_eq!(
            err("A=${B C}"),
            "env entry 'A=${B C}': '${B C}' is not a variable name"
        );
        assert!(check(&list(&["A=${B"])).is_err());
        assert!(check(&list(&["A=$B"])).is_ok());
    }

    proptest! {
        /// Text without `$` comes through unchanged, and expanding a value that names only
        /// set variables never leaves a `$NAME` behind.
        #[test]
        fn plain_text_is_unchanged(s in "[^$]{0,40}") {
            prop_assert_eq!(expand(&s, &Env::new(), "t").unwrap(), s);
        }

        #[test]
        fn set_variables_are_replaced(names in proptest::collection::vec("[A-Z_][A-Z0-9_]{0,6}", 1..5),
                                      sep in "[-/:. ]") {
            let env: Env = names.iter().map(|n| (n.clone(), format!("<{n}>"))).collect();
            let braced: Vec<String> = names.iter().map(|n| format!("${{{n}}}")).collect();
            let got = expand(&braced.join(&sep), &env, "t").unwrap();
            let want: Vec<String> = names.iter().map(|n| format!("<{n}>")).collect();
            prop_assert_eq!(got, want.join(&sep));
        }
    }
}
