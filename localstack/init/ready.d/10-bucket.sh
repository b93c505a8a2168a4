#!/bin/bash
# LocalStack runs this once S3 is ready to serve requests (the "ready" stage). It creates
# the bucket the consumers and `dsa-ingest submit` use. The head-bucket check keeps it
# harmless when LocalStack keeps its state between restarts (PERSISTENCE=1).
set -euo pipefail

bucket="${DSA_INGEST_BUCKET:-dsa-ingest}"
if awslocal s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
    echo "bucket $bucket exists"
else
    awslocal s3api create-bucket --bucket "$bucket" >/dev/null
    echo "bucket $bucket created"
fi
