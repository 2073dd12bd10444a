SELECT `as_snap_pro_plan_7`.`user_id`, `as_snap_pro_plan_7`.`email`, `as_snap_pro_plan_7`.`name`, `as_snap_pro_plan_7`.`title`, `as_snap_pro_plan_7`.`company_id` 
FROM `audience_sync_planner`.`as_snap_pro_plan_7` 
WHERE `as_snap_pro_plan_7`.`planner_ref` IN (SELECT `as_chg_pro_plan_7`.`planner_ref` 
FROM `audience_sync_planner`.`as_chg_pro_plan_7`)
