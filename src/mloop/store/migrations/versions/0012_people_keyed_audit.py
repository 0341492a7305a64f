"""people and the keyed audit chain: a token names the person it belongs to (existing tokens
take their name as the person and keep their role: an admin token stays admin), and every
event carries an HMAC-SHA256 of its hash under a key kept outside the store (events written
before stay without one: the verifier accepts them only as the chain's oldest prefix)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("person", sa.String(200), nullable=True))
    op.execute("update api_tokens set person = name")
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("mac", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("mac")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("person")
