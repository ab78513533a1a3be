"""CPU per primary-key read of an order: through an ORM Session, through SQLAlchemy Core, and on
a pooled psycopg2 cursor (servicekit.sql, what the services use). The figures that decided to
keep the ORM off the request path.

    python -m bench.data_access   # after `make infra-up`; uses the `ecommerce_bench` database
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from decimal import Decimal

from sqlalchemy import Engine, bindparam, create_engine, select, text
from sqlalchemy.orm import sessionmaker

from dbschema.tables import OrderRecord
from order_service.service import SELECT_ORDER
from servicekit.schema import migrate
from servicekit.settings import with_password
from servicekit.sql import Database

DATABASE_URL = "postgresql+psycopg2://ecommerce@127.0.0.1:55432/ecommerce_bench"


def cpu_microseconds(read: Callable[[], object], reads: int) -> float:
    read()  # warm: connection opened, statement caches filled
    started = time.process_time()
    for _ in range(reads):
        read()
    return (time.process_time() - started) / reads * 1e6


def some_order(engine: Engine) -> uuid.UUID:
    with engine.begin() as connection:
        user_id = uuid.uuid4()
        connection.execute(
            text("INSERT INTO users (id, email, name) VALUES (:id, :email, 'Bench')"),
            {"id": user_id, "email": f"{user_id}@example.com"},
        )
        order_id = uuid.uuid4()
        connection.execute(
            text(
                "INSERT INTO orders (id, user_id, amount, currency_code, status)"
                " VALUES (:id, :user_id, :amount, 'USD', 'CREATED')"
            ),
            {"id": order_id, "user_id": user_id, "amount": Decimal("42")},
        )
    return order_id


def data_access_rows(database_url: str = DATABASE_URL, reads: int = 2000) -> list[str]:
    migrate(database_url)
    engine = create_engine(with_password(database_url), pool_size=2)
    order_id = some_order(engine)
    sessions = sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
    core_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    table = OrderRecord.__table__
    core_query = select(table).where(table.c.id == bindparam("id"))
    database = Database(engine)

    def orm() -> object:
        with sessions() as session:
            return session.get(OrderRecord, order_id)

    def core() -> object:
        with core_engine.connect() as connection:
            return connection.execute(core_query, {"id": order_id}).one()

    def pooled_cursor() -> object:
        return database.fetch_one(SELECT_ORDER, {"id": order_id})

    try:
        figures = {
            "ORM Session.get (autocommit)": cpu_microseconds(orm, reads),
            "SQLAlchemy Core select (autocommit)": cpu_microseconds(core, reads),
            "pooled psycopg2 cursor (servicekit.sql)": cpu_microseconds(pooled_cursor, reads),
        }
    finally:
        engine.dispose()
    baseline = figures["pooled psycopg2 cursor (servicekit.sql)"]
    return [
        "| read of one order by id | CPU µs per read (client side) | ÷ pooled cursor |",
        "|---|---:|---:|",
        *(f"| {name} | {cpu:.0f} | {cpu / baseline:.1f} |" for name, cpu in figures.items()),
    ]


def main() -> None:
    print("\n".join(data_access_rows()))


if __name__ == "__main__":
    main()
