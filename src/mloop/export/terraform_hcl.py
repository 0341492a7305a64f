"""The fixed text of the Terraform module ``mloop export terraform`` writes, one constant per
file. Only names and defaults vary by project, and those are Terraform variables (filled in
variables.tf by :mod:`mloop.export.terraform`), so these files read as hand-written HCL.

Each ``#checkov:skip`` says why the check does not fit this module; every other check of
checkov's Terraform policies passes (tests/test_export_terraform.py runs it).
"""

from __future__ import annotations

VERSIONS = """\
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.60"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.31"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = local.tags
  }
}

# The cluster mloop's pods run on (EKS or any other): kubectl's config file and context.
provider "kubernetes" {
  config_path    = var.kubeconfig_path
  config_context = var.kube_context
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  tags            = merge({ "app.kubernetes.io/part-of" = "mloop", project = var.name }, var.tags)
  account_id      = data.aws_caller_identity.current.account_id
  partition       = data.aws_partition.current.partition
  server_sa       = "${var.name}-server"
  controller_sa   = "${var.name}-controller"
}
"""

KMS = """\
# One customer-managed key encrypts the bucket, the database, its Performance Insights and
# the master password's secret. The account's administrators manage it (the account root, as
# AWS's default key policy has it); mloop's roles may only use it (granted in iam.tf).
resource "aws_kms_key" "mloop" {
  description             = "mloop ${var.name}: artifacts, snapshots, metadata database"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "AccountAdministers"
      Effect    = "Allow"
      Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
}

resource "aws_kms_alias" "mloop" {
  name          = "alias/mloop-${var.name}"
  target_key_id = aws_kms_key.mloop.key_id
}
"""

S3 = """\
# MLflow's artifacts, mloop's snapshots, step outputs and inference log: one private bucket,
# versioned (an overwritten or deleted object can be recovered), encrypted with the key.
resource "aws_s3_bucket" "mloop" {
  # Access logs go to a log bucket the organisation already has (aws_s3_bucket_logging in
  # the calling configuration); replication is for where a second region is required.
  #checkov:skip=CKV_AWS_18:access logs need a separate log bucket, kept outside this module
  #checkov:skip=CKV_AWS_144:replication to a second region is a choice this module leaves open
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events: mloop reads the stores itself
  bucket        = var.bucket_name != "" ? var.bucket_name : "mloop-${var.name}-${local.account_id}"
  force_destroy = false
}

resource "aws_s3_bucket_versioning" "mloop" {
  bucket = aws_s3_bucket.mloop.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "mloop" {
  bucket = aws_s3_bucket.mloop.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.mloop.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "mloop" {
  bucket                  = aws_s3_bucket.mloop.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "mloop" {
  bucket = aws_s3_bucket.mloop.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# Old versions of overwritten objects are kept var.noncurrent_days, then expire; an upload
# that never completed is cleaned up after a week.
resource "aws_s3_bucket_lifecycle_configuration" "mloop" {
  bucket = aws_s3_bucket.mloop.id
  rule {
    id     = "noncurrent-and-incomplete"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

# TLS only: a request over plain HTTP is refused.
resource "aws_s3_bucket_policy" "mloop" {
  bucket = aws_s3_bucket.mloop.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "DenyInsecureTransport"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.mloop.arn, "${aws_s3_bucket.mloop.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
  depends_on = [aws_s3_bucket_public_access_block.mloop]
}
"""

RDS = """\
# PostgreSQL for MLflow's tracking store and mloop's own store (two databases on one
# instance): private (no public address, reachable only from var.client_security_group_ids
# inside the VPC), encrypted at rest with the key, TLS required, its master password kept by
# AWS Secrets Manager (never in Terraform's state).
resource "aws_db_subnet_group" "mloop" {
  name       = "mloop-${var.name}"
  subnet_ids = var.private_subnet_ids
}

resource "aws_security_group" "db" {
  name        = "mloop-${var.name}-db"
  description = "PostgreSQL of mloop ${var.name}: reachable from the cluster only"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "db" {
  for_each                     = toset(var.client_security_group_ids)
  description                  = "PostgreSQL from ${each.value}"
  security_group_id            = aws_security_group.db.id
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_db_parameter_group" "mloop" {
  name   = "mloop-${var.name}-pg16"
  family = "postgres16"
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_statement"
    value = "ddl"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name = "mloop-${var.name}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "mloop" {
  identifier                          = "mloop-${var.name}"
  engine                              = "postgres"
  engine_version                      = var.db_engine_version
  instance_class                      = var.db_instance_class
  allocated_storage                   = var.db_allocated_storage
  max_allocated_storage               = var.db_allocated_storage * 4
  db_name                             = "mloop"
  username                            = var.db_username
  manage_master_user_password         = true
  master_user_secret_kms_key_id       = aws_kms_key.mloop.arn
  db_subnet_group_name                = aws_db_subnet_group.mloop.name
  vpc_security_group_ids              = [aws_security_group.db.id]
  parameter_group_name                = aws_db_parameter_group.mloop.name
  publicly_accessible                 = false
  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.mloop.arn
  multi_az                            = true
  iam_database_authentication_enabled = true
  backup_retention_period             = 14
  copy_tags_to_snapshot               = true
  deletion_protection                 = true
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "mloop-${var.name}-final"
  auto_minor_version_upgrade          = true
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]
  monitoring_interval                 = 60
  monitoring_role_arn                 = aws_iam_role.rds_monitoring.arn
  performance_insights_enabled        = true
  performance_insights_kms_key_id     = aws_kms_key.mloop.arn
}
"""


# The pods' two roles (server, controller) differ only in their names, and all three roles
# share one shape; these build those blocks, %-templates so the HCL's own braces stay as
# written. Each role ``R`` is assumed under ``R_trust`` and runs on the service account
# ``local.R_sa`` (the pods').

_IRSA_TRUST = """\
data "aws_iam_policy_document" "%(role)s_trust" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${local.%(role)s_sa}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}
"""

_ROLE = """\
resource "aws_iam_role" "%(role)s" {
%(settings)s}

resource "aws_iam_role_policy" "%(role)s" {
  name   = "mloop-stores"
  role   = aws_iam_role.%(role)s.id
  policy = data.aws_iam_policy_document.%(policy)s.json
}
"""

_SERVICE_ACCOUNT = """\
resource "kubernetes_service_account_v1" "%(role)s" {
  metadata {
    name        = local.%(role)s_sa
    namespace   = var.namespace
    annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.%(role)s.arn }
  }
  automount_service_account_token = true
  depends_on                      = [kubernetes_namespace_v1.mloop]
}
"""


def _irsa_trust(role: str) -> str:
    """The trust policy of a pod's role: EKS's OIDC tokens of its service account only."""
    return _IRSA_TRUST % {"role": role}


def _role(role: str, policy: str, **settings: str) -> str:
    """Role ``role`` (``settings``: more of its arguments, HCL values) with the inline policy
    ``policy``, its ``=`` aligned as ``terraform fmt`` leaves them."""
    lines = {"name": '"mloop-${var.name}-' + role + '"',
             "assume_role_policy": f"data.aws_iam_policy_document.{role}_trust.json",
             **settings}
    width = max(map(len, lines))
    return _ROLE % {"role": role, "policy": policy,
                    "settings": "".join(f"  {k.ljust(width)} = {v}\n" for k, v in lines.items())}


def _service_account(role: str) -> str:
    """The Kubernetes service account of a pod's role (IRSA: annotated with the role)."""
    return _SERVICE_ACCOUNT % {"role": role}


_IAM_HEAD = """\
# Three roles, each allowed only what its process does:
# - server (`mloop serve`, `mloop ui`): reads models and snapshots, appends to the inference log;
# - controller (the `mloop loop --once` CronJob): retrains and promotes, so it reads and writes
#   every prefix of the bucket;
# - ci (`mloop ci check` and the promotions of the exported workflows): the same as the
#   controller, assumed from the CI platform's OIDC tokens of one repository only.
# The pods get theirs through EKS's IAM roles for service accounts (IRSA); no role gets
# anything outside this bucket and this key.

locals {
  bucket_arn  = aws_s3_bucket.mloop.arn
  objects_arn = "${aws_s3_bucket.mloop.arn}/*"
  oidc_issuer = trimprefix(var.eks_oidc_issuer_url, "https://")
}
"""

_IAM_CI_TRUST_AND_POLICIES = """\
# GitHub Actions' OIDC tokens of var.ci_repository only (any branch or pull request: the
# workflows gate before they promote, and production waits for the environment's reviewers).
data "aws_iam_policy_document" "ci_trust" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.ci_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "token.actions.githubusercontent.com:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringLike"
      variable = "token.actions.githubusercontent.com:sub"
      values   = ["repo:${var.ci_repository}:*"]
    }
  }
}

data "aws_iam_policy_document" "server" {
  statement {
    sid       = "ListTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [local.bucket_arn]
  }
  statement {
    sid       = "ReadModelsAndSnapshots"
    actions   = ["s3:GetObject"]
    resources = [local.objects_arn]
  }
  statement {
    sid       = "AppendTheInferenceLog"
    actions   = ["s3:PutObject"]
    resources = ["${local.bucket_arn}/inference/*"]
  }
  statement {
    sid       = "UseTheKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.mloop.arn]
  }
}

data "aws_iam_policy_document" "writer" {
  statement {
    sid       = "ListTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [local.bucket_arn]
  }
  statement {
    sid       = "ReadAndWriteTheStores"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = [local.objects_arn]
  }
  statement {
    sid       = "UseTheKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.mloop.arn]
  }
}
"""

# one blank line between blocks
IAM = "\n".join([
    _IAM_HEAD,
    _irsa_trust("server"),
    _irsa_trust("controller"),
    _IAM_CI_TRUST_AND_POLICIES,
    _role("server", "server"),
    _role("controller", "writer"),
    _role("ci", "writer", max_session_duration="3600"),
])

_KUBERNETES_HEAD = """\
# The objects of `mloop export k8s` (k8s-*.json here, the same objects that export writes as
# YAML), applied by the kubernetes provider into var.namespace, with the two service accounts
# that carry the IAM roles. ServiceMonitor and PrometheusRule need prometheus-operator's CRDs
# in the cluster when planning: var.prometheus_operator = false leaves them out.
locals {
  manifest_files = [
    for f in fileset(path.module, "k8s-*.json") : f
    if var.prometheus_operator || !contains(local.operator_files, f)
  ]
  operator_files = ["k8s-servicemonitor.json", "k8s-prometheusrule.json"]
  manifests = {
    for f in local.manifest_files :
    trimsuffix(trimprefix(f, "k8s-"), ".json") => jsondecode(file("${path.module}/${f}"))
  }
}

resource "kubernetes_namespace_v1" "mloop" {
  count = var.create_namespace ? 1 : 0
  metadata {
    name = var.namespace
  }
}
"""

_KUBERNETES_MANIFESTS = """\
resource "kubernetes_manifest" "mloop" {
  for_each = local.manifests
  manifest = merge(each.value, {
    metadata = merge(each.value.metadata, { namespace = var.namespace })
  })
  depends_on = [kubernetes_service_account_v1.server, kubernetes_service_account_v1.controller]
}
"""

KUBERNETES = "\n".join([
    _KUBERNETES_HEAD,
    _service_account("server"),
    _service_account("controller"),
    _KUBERNETES_MANIFESTS,
])

OUTPUTS = """\
output "bucket" {
  description = "The stores' bucket"
  value       = aws_s3_bucket.mloop.bucket
}

output "kms_key_arn" {
  description = "The key that encrypts the bucket and the database"
  value       = aws_kms_key.mloop.arn
}

output "stores" {
  description = "mloop.yaml's stores for this topology (password: master_user_secret_arn)"
  value = {
    artifact_root     = "s3://${aws_s3_bucket.mloop.bucket}/artifacts"
    data_uri          = "s3://${aws_s3_bucket.mloop.bucket}/data"
    outputs_uri       = "s3://${aws_s3_bucket.mloop.bucket}/outputs"
    inference_log_uri = "s3://${aws_s3_bucket.mloop.bucket}/inference"
    tracking_uri      = "postgresql://${var.db_username}:$${MLOOP_DB_PASSWORD}@${aws_db_instance.mloop.endpoint}/mlflow"
    store_uri         = "postgresql+psycopg://${var.db_username}:$${MLOOP_DB_PASSWORD}@${aws_db_instance.mloop.endpoint}/mloop"
  }
}

output "db_endpoint" {
  description = "host:port of the PostgreSQL instance (private)"
  value       = aws_db_instance.mloop.endpoint
}

output "master_user_secret_arn" {
  description = "The Secrets Manager secret that holds the database's master password"
  value       = aws_db_instance.mloop.master_user_secret[0].secret_arn
}

output "role_arns" {
  description = "The IAM roles of the server, the controller and CI"
  value = {
    server     = aws_iam_role.server.arn
    controller = aws_iam_role.controller.arn
    ci         = aws_iam_role.ci.arn
  }
}

output "namespace" {
  description = "Where the Kubernetes objects are"
  value       = var.namespace
}
"""
