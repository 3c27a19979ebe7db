//! s3s-fs with an ordered index of its keys, so that a ListObjectsV2 page costs what it costs on
//! S3, MinIO or Garage: the page's keys, not the bucket. s3s-fs 0.14 answers every page by
//! walking, stat-ing and sorting the whole bucket (O(N²) for a full listing), which made a
//! listing of 300,000 objects time out page by page. Every other operation is s3s-fs's own; the
//! index follows the writes and deletes that succeed.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use s3s_fs::FileSystem;

/// s3s-fs, listing from an ordered index of keys per bucket.
pub struct Ordered {
    fs: FileSystem,
    root: PathBuf,
    keys: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Ordered {
    /// Serves the buckets under `root` (each a directory), indexing the objects already there.
    pub fn new(root: &Path) -> anyhow::Result<Ordered> {
        let fs = FileSystem::new(root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let root = root.canonicalize()?;
        let mut keys = BTreeMap::new();
        for bucket in std::fs::read_dir(&root)? {
            let bucket = bucket?;
            if !bucket.file_type()?.is_dir() {
                continue;
            }
            let Some(name) = bucket.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let mut held = BTreeSet::new();
            let mut dirs = vec![bucket.path()];
            while let Some(dir) = dirs.pop() {
                for file in std::fs::read_dir(&dir)? {
                    let file = file?;
                    if file.file_type()?.is_dir() {
                        dirs.push(file.path());
                    } else if let Some(key) = key_of(&bucket.path(), &file.path()) {
                        held.insert(key);
                    }
                }
            }
            keys.insert(name, held);
        }
        Ok(Ordered {
            fs,
            root,
            keys: Mutex::new(keys),
        })
    }

    fn index(&self, bucket: &str, key: &str, held: bool) {
        // A key ending in '/' is a directory in s3s-fs, never listed as an object.
        if key.ends_with('/') {
            return;
        }
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let set = keys.entry(bucket.to_string()).or_default();
        if held {
            set.insert(key.to_string());
        } else {
            set.remove(key);
        }
    }
}

/// The key of the file at `path` in the bucket at `bucket_root`, as s3s-fs lists it.
fn key_of(bucket_root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(bucket_root).ok()?;
    let mut parts = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => parts.push(name.to_str()?),
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

#[async_trait::async_trait]
impl S3 for Ordered {
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        if req.input.delimiter.is_some() {
            return self.fs.list_objects_v2(req).await;
        }
        let input = req.input;
        let prefix = input
            .prefix
            .as_deref()
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string();
        let max_keys = usize::try_from(input.max_keys.unwrap_or(1000)).unwrap_or(1000);
        let after = match (
            input.continuation_token.as_deref(),
            input.start_after.as_deref(),
        ) {
            (Some(a), Some(b)) => Some(a.max(b).to_string()),
            (Some(a), None) | (None, Some(a)) => Some(a.to_string()),
            (None, None) => None,
        };
        // The page's keys (and whether one more follows), under the lock; then their files.
        let (page, truncated) = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            let Some(set) = keys.get(&input.bucket) else {
                return Err(s3_error!(NoSuchBucket));
            };
            let start = match &after {
                Some(after) if after.as_str() >= prefix.as_str() => Bound::Excluded(after.clone()),
                _ => Bound::Included(prefix.clone()),
            };
            let mut page: Vec<String> = set
                .range((start, Bound::Unbounded))
                .take_while(|key| key.starts_with(&prefix))
                .take(max_keys.saturating_add(1))
                .cloned()
                .collect();
            let truncated = max_keys > 0 && page.len() > max_keys;
            page.truncate(max_keys);
            (page, truncated)
        };
        let bucket_root = self.root.join(&input.bucket);
        let mut contents = Vec::with_capacity(page.len());
        for key in &page {
            // Deleted since the page was taken: not listed, as on S3.
            let Ok(metadata) = tokio::fs::metadata(bucket_root.join(key)).await else {
                continue;
            };
            let size = i64::try_from(metadata.len()).map_err(|_| s3_error!(InternalError))?;
            contents.push(Object {
                key: Some(key.clone()),
                last_modified: metadata.modified().ok().map(Timestamp::from),
                size: Some(size),
                ..Default::default()
            });
        }
        let key_count = i32::try_from(contents.len()).map_err(|_| s3_error!(InternalError))?;
        let output = ListObjectsV2Output {
            key_count: Some(key_count),
            max_keys: input.max_keys.or(Some(1000)),
            is_truncated: Some(truncated),
            contents: (!contents.is_empty()).then_some(contents),
            continuation_token: input.continuation_token,
            next_continuation_token: if truncated {
                page.last().cloned()
            } else {
                None
            },
            encoding_type: input.encoding_type,
            name: Some(input.bucket),
            prefix: input.prefix,
            start_after: input.start_after,
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.fs.put_object(req).await?;
        self.index(&bucket, &key, true);
        Ok(out)
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.fs.copy_object(req).await?;
        self.index(&bucket, &key, true);
        Ok(out)
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.fs.complete_multipart_upload(req).await?;
        self.index(&bucket, &key, true);
        Ok(out)
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.fs.delete_object(req).await?;
        self.index(&bucket, &key, false);
        Ok(out)
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let bucket = req.input.bucket.clone();
        let out = self.fs.delete_objects(req).await?;
        for deleted in out.output.deleted.iter().flatten() {
            if let Some(key) = &deleted.key {
                self.index(&bucket, key, false);
            }
        }
        Ok(out)
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = req.input.bucket.clone();
        let out = self.fs.create_bucket(req).await?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.entry(bucket).or_default();
        Ok(out)
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = req.input.bucket.clone();
        let out = self.fs.delete_bucket(req).await?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&bucket);
        Ok(out)
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.fs.get_bucket_location(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.fs.create_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.fs.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.fs.upload_part_copy(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.fs.list_parts(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.fs.abort_multipart_upload(req).await
    }
}
