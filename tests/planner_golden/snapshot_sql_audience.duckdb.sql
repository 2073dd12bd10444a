CREATE TABLE audience_sync_planner.as_snap_pro_plan_7 AS SELECT coalesce(trim(CAST(user_id AS VARCHAR)), trim(CAST(email AS VARCHAR))) AS planner_ref, user_id, email, name, title, company_id 
FROM (SELECT * 
FROM (SELECT id AS user_id, email, name, title, company_id FROM prod.users WHERE plan = 'pro') AS audience_sync_query) AS audience_rows
