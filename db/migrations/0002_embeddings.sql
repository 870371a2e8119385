-- eglo schema v2: one partial HNSW index per embedding model, for similar-run search.
-- The embedding column has no fixed dimension, and HNSW needs one: each index casts to its
-- model's dimension and covers only that model's rows. A query uses an index only when it
-- repeats the same expression (embedding::vector(N)), operator class (cosine: <=>) and
-- predicate (model = '...'), as worker/analytics/similarity.py does.
-- Idempotent. On a large existing table, build these first with CREATE INDEX CONCURRENTLY under
-- the same names (this migration then finds them and skips), since a plain build blocks writes.
-- m and ef_construction: benchmarks/similarity_recall.py, figures in docs/similarity.md.

CREATE INDEX IF NOT EXISTS optimization_embeddings_features_v1_hnsw
    ON optimization_embeddings USING hnsw ((embedding::vector(64)) vector_cosine_ops)
    WITH (m = 16, ef_construction = 64)
    WHERE model = 'features-v1';

CREATE INDEX IF NOT EXISTS optimization_embeddings_minilm_hnsw
    ON optimization_embeddings USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WITH (m = 16, ef_construction = 64)
    WHERE model = 'all-MiniLM-L6-v2';

-- HNSW indexes vectors of up to 2,000 dimensions; 1,536 fits.
CREATE INDEX IF NOT EXISTS optimization_embeddings_openai_hnsw
    ON optimization_embeddings USING hnsw ((embedding::vector(1536)) vector_cosine_ops)
    WITH (m = 16, ef_construction = 64)
    WHERE model = 'text-embedding-3-small';
