INSERT INTO `audience_sync_planner`.`as_snap_pro_plan_6` (`planner_ref`, `user_id`, `email`, `name`, `title`, `company_id`) SELECT `as_chg_pro_plan_7`.`planner_ref`, `as_chg_pro_plan_7`.`user_id`, `as_chg_pro_plan_7`.`email`, `as_chg_pro_plan_7`.`name`, `as_chg_pro_plan_7`.`title`, `as_chg_pro_plan_7`.`company_id` 
FROM `audience_sync_planner`.`as_chg_pro_plan_7` 
WHERE `as_chg_pro_plan_7`.`planner_new`
