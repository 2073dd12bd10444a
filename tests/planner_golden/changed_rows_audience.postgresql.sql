CREATE TABLE audience_sync_planner.as_chg_pro_plan_7 AS WITH unmatched AS 
(SELECT coalesce(new_rows.planner_ref, old_rows.planner_ref) AS planner_ref, new_rows.planner_ref IS NOT NULL AS planner_new, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.user_id ELSE old_rows.user_id END AS user_id, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.email ELSE old_rows.email END AS email, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.name ELSE old_rows.name END AS name, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.title ELSE old_rows.title END AS title, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.company_id ELSE old_rows.company_id END AS company_id 
FROM (SELECT coalesce(trim(CAST(user_id AS VARCHAR)), trim(CAST(email AS VARCHAR))) AS planner_ref, user_id, email, name, title, company_id 
FROM (SELECT * 
FROM (SELECT id AS user_id, email, name, title, company_id FROM prod.users WHERE plan = 'pro') AS audience_sync_query) AS audience_rows) AS new_rows FULL OUTER JOIN (SELECT audience_sync_planner.as_snap_pro_plan_6.planner_ref AS planner_ref, audience_sync_planner.as_snap_pro_plan_6.user_id AS user_id, audience_sync_planner.as_snap_pro_plan_6.email AS email, audience_sync_planner.as_snap_pro_plan_6.name AS name, audience_sync_planner.as_snap_pro_plan_6.title AS title, audience_sync_planner.as_snap_pro_plan_6.company_id AS company_id 
FROM audience_sync_planner.as_snap_pro_plan_6) AS old_rows ON new_rows.planner_ref = old_rows.planner_ref AND new_rows.user_id IS NOT DISTINCT FROM old_rows.user_id AND new_rows.email IS NOT DISTINCT FROM old_rows.email AND new_rows.name IS NOT DISTINCT FROM old_rows.name AND new_rows.title IS NOT DISTINCT FROM old_rows.title AND new_rows.company_id IS NOT DISTINCT FROM old_rows.company_id 
WHERE (new_rows.planner_ref IS NULL OR old_rows.planner_ref IS NULL) AND coalesce(new_rows.planner_ref, old_rows.planner_ref) IS NOT NULL), 
was AS 
(SELECT audience_sync_planner.as_snap_pro_plan_6.planner_ref AS planner_ref, audience_sync_planner.as_snap_pro_plan_6.user_id AS user_id, audience_sync_planner.as_snap_pro_plan_6.email AS email, audience_sync_planner.as_snap_pro_plan_6.name AS name, audience_sync_planner.as_snap_pro_plan_6.title AS title, audience_sync_planner.as_snap_pro_plan_6.company_id AS company_id 
FROM audience_sync_planner.as_snap_pro_plan_6 
WHERE audience_sync_planner.as_snap_pro_plan_6.planner_ref IN (SELECT unmatched.planner_ref 
FROM unmatched))
 SELECT false AS planner_new, was.planner_ref, was.user_id, was.email, was.name, was.title, was.company_id 
FROM was UNION ALL SELECT true AS planner_new, unmatched.planner_ref, unmatched.user_id, unmatched.email, unmatched.name, unmatched.title, unmatched.company_id 
FROM unmatched 
WHERE unmatched.planner_new UNION ALL SELECT true AS planner_new, was.planner_ref, was.user_id, was.email, was.name, was.title, was.company_id 
FROM was 
WHERE NOT (EXISTS (SELECT * 
FROM unmatched AS gone 
WHERE NOT gone.planner_new AND gone.planner_ref = was.planner_ref AND gone.user_id IS NOT DISTINCT FROM was.user_id AND gone.email IS NOT DISTINCT FROM was.email AND gone.name IS NOT DISTINCT FROM was.name AND gone.title IS NOT DISTINCT FROM was.title AND gone.company_id IS NOT DISTINCT FROM was.company_id))
