//! Consumer checkpoints, kept in the consumer's own database and written in the same
//! transaction as the consumer's effects.

use sqlx::{Any, AnyConnection};

pub async fn load<'e, E>(executor: E, name: &str) -> Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(executor)
            .await?;
    Ok(position.unwrap_or(0))
}

pub async fn save(conn: &mut AnyConnection, name: &str, position: i64) -> Result<(), sqlx::Error> {
    save_statement(name, position).execute(conn).await
}

/// [`save`] as a statement, to run on any connection.
pub fn save_statement(name: &str, position: i64) -> crate::db::Statement {
    use crate::db::Bind;
    crate::db::Statement::new(
        "INSERT INTO checkpoints (name, position, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        vec![
            Bind::Text(name.to_owned()),
            Bind::Integer(position),
            Bind::Text(crate::timestamp(chrono::Utc::now())),
        ],
    )
}
