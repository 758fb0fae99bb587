//! Key patterns (`in/*.fasta.gz`, `runs/2026-*/part-?.parquet`), with the `glob` crate's
//! `Pattern`: the same rules for `esmbed embed` inputs and SQL's `STORED AS FASTA` locations.
//!
//! `*` is any characters within one path segment, `?` one character, `[abc]` / `[!abc]` one of a
//! set, `**` any number of segments (none included). The pattern is matched against the whole key, below the
//! deepest folder without wildcards, which is where the store is listed.

use futures::TryStreamExt;
use glob::{MatchOptions, Pattern};
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStore};

/// Whether `text` holds a wildcard (`*`, `?` or `[`).
pub fn has_wildcards(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// How keys are matched: a separator is never matched by a wildcard but `**`; leading dots are
/// not special (a glob names the files it wants).
const RULES: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// A key, or a key pattern.
#[derive(Debug, Clone)]
pub struct KeyPattern {
    /// The deepest folder without wildcards (`""` for the root).
    base: String,
    /// The pattern, if the key has wildcards.
    pattern: Option<Pattern>,
    /// Whether the pattern reaches no deeper than one segment below `base`.
    one_level: bool,
}

impl KeyPattern {
    /// The key as typed (without a leading `/`).
    pub fn new(key: &str) -> Result<Self, glob::PatternError> {
        let Some(first) = key.find(['*', '?', '[']) else {
            return Ok(Self {
                base: key.trim_end_matches('/').to_string(),
                pattern: None,
                one_level: false,
            });
        };
        let base = key[..first].rsplit_once('/').map_or("", |(b, _)| b);
        let below = &key[base.len()..].trim_start_matches('/');
        Ok(Self {
            base: base.to_string(),
            pattern: Some(Pattern::new(key)?),
            one_level: !below.contains('/'),
        })
    }

    /// Whether the key has wildcards.
    pub fn is_glob(&self) -> bool {
        self.pattern.is_some()
    }

    /// Where to list: the deepest folder without wildcards (the key itself without any).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether `key` matches (a key without wildcards matches itself).
    pub fn matches(&self, key: &str) -> bool {
        match &self.pattern {
            Some(pattern) => pattern.matches_with(key, RULES),
            None => key == self.base,
        }
    }
}

/// The objects of `store` whose keys match `pattern`, sorted by key. A pattern of one segment
/// lists one folder, a deeper one everything below its base.
pub async fn matching(
    store: &dyn ObjectStore,
    pattern: &KeyPattern,
) -> object_store::Result<Vec<ObjectMeta>> {
    let base = (!pattern.base.is_empty()).then(|| Key::from(pattern.base.as_str()));
    let listed: Vec<ObjectMeta> = if pattern.one_level {
        store.list_with_delimiter(base.as_ref()).await?.objects
    } else {
        store.list(base.as_ref()).try_collect().await?
    };
    let mut found: Vec<ObjectMeta> = listed
        .into_iter()
        .filter(|meta| pattern.matches(meta.location.as_ref()))
        .collect();
    found.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        KeyPattern::new(pattern).unwrap().matches(key)
    }

    #[test]
    fn globs() {
        assert!(matches("in/*.fasta.gz", "in/a.fasta.gz"));
        assert!(!matches("in/*.fasta.gz", "in/sub/a.fasta.gz"));
        assert!(matches("in/part-?.parquet", "in/part-1.parquet"));
        assert!(!matches("in/part-?.parquet", "in/part-10.parquet"));
        assert!(matches("in/**/*.fa", "in/a/b/x.fa"));
        assert!(matches("in/[ab].fa", "in/b.fa") && !matches("in/[ab].fa", "in/c.fa"));
        assert!(matches("in/*", "in/.hidden"));
        assert!(matches("in/x.fa", "in/x.fa") && !matches("in/x.fa", "in/y.fa"));
    }

    #[test]
    fn bases_and_depth() {
        let p = KeyPattern::new("runs/2026-*/part-?.parquet").unwrap();
        assert_eq!((p.base(), p.is_glob(), p.one_level), ("runs", true, false));
        let p = KeyPattern::new("in/*.fa").unwrap();
        assert_eq!((p.base(), p.one_level), ("in", true));
        let p = KeyPattern::new("*.fa").unwrap();
        assert_eq!((p.base(), p.one_level), ("", true));
        assert!(KeyPattern::new("in/[").is_err());
    }

    #[test]
    fn no_exponential_backtracking() {
        let key = format!("{}b", "a".repeat(60));
        let started = std::time::Instant::now();
        assert!(!matches(&"*a".repeat(20), &key));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn listing_matches_one_level_or_deeper() {
        use object_store::memory::InMemory;
        use object_store::ObjectStoreExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = InMemory::new();
        let keys = |found: Vec<ObjectMeta>| -> Vec<String> {
            found.into_iter().map(|m| m.location.to_string()).collect()
        };
        runtime.block_on(async {
            for key in ["in/a.fa", "in/b.fa", "in/sub/c.fa", "in/d.txt"] {
                store.put(&Key::from(key), "x".into()).await.unwrap();
            }
            let one = KeyPattern::new("in/*.fa").unwrap();
            assert_eq!(
                keys(matching(&store, &one).await.unwrap()),
                ["in/a.fa", "in/b.fa"]
            );
            let deep = KeyPattern::new("in/**/*.fa").unwrap();
            assert_eq!(
                keys(matching(&store, &deep).await.unwrap()),
                ["in/a.fa", "in/b.fa", "in/sub/c.fa"]
            );
        });
    }
}
